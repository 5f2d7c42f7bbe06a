"""Helpers shared by test modules: reference pipelines, image comparison, real `serve` processes."""

from __future__ import annotations

import base64
import functools
import io
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import httpx
import numpy as np
import openai
import torch
from PIL import Image

from configs import OmniDiffusionSamplingParams, load_family
from engine.host import free_port
from workers.qwen_vl_processor import Qwen2VLImageOnlyProcessor

FAMILIES = ["z-image", "qwen-image", "qwen-image-edit", "qwen-image-edit-plus", "flux", "sd3"]
SERVE = str(Path(sys.executable).parent / "serve")
STARTUP_TIMEOUT_S = 180


# images ----------------------------------------------------------------------------------------
def condition_image(size: tuple[int, int] = (48, 32)) -> Image.Image:
    """A small deterministic RGB image for edit requests."""
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    pixels = np.stack([x * 255 // size[0], y * 255 // size[1], (x + y) % 256], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


def condition_images(family: str) -> list[Image.Image]:
    """The input images of a reference edit: one for the edit family, two (one result) for plus."""
    if family == "qwen-image-edit":
        return [condition_image()]
    if family == "qwen-image-edit-plus":
        return [condition_image(), condition_image((32, 48)).rotate(90, expand=True)]
    return []


def max_pixel_difference(a: Image.Image, b: Image.Image) -> int:
    assert a.size == b.size, (a.size, b.size)
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def decode_b64(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def b64_pixels(b64: str) -> np.ndarray:
    return np.asarray(decode_b64(b64).convert("RGB"), dtype=np.int16)


# plain diffusers references ----------------------------------------------------------------------
REFERENCE_PROMPT = "a cat reading a book"
REFERENCE_SEED = 1234
REFERENCE_STEPS = 4


def load_plain_pipeline(path: Path) -> diffusers.DiffusionPipeline:
    """The pipeline exactly as a diffusers user would load it (plus the torchvision-free processor)."""
    extra = {}
    if (path / "processor").is_dir():
        extra["processor"] = Qwen2VLImageOnlyProcessor.from_pretrained(path / "processor")
    pipeline = diffusers.DiffusionPipeline.from_pretrained(path, **extra)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


FLUX_TRUE_CFG = {"negative_prompt": "blurry", "true_cfg_scale": 2.0}


def reference_prompt(family: str) -> dict:
    """REFERENCE_PROMPT with the family's condition images, as Omni takes a prompt."""
    prompt = {"prompt": REFERENCE_PROMPT}
    if condition_images(family):
        prompt["multi_modal_data"] = {"image": condition_images(family)}
    return prompt


def reference_params(family: str, **values) -> OmniDiffusionSamplingParams:
    """The sampling values reference_image uses (steps, seed, FLUX.1's true CFG), plus `values`."""
    return OmniDiffusionSamplingParams(**{"num_inference_steps": REFERENCE_STEPS, "seed": REFERENCE_SEED,
                                          **(FLUX_TRUE_CFG if family == "flux" else {}), **values})


def edit_mask(size: tuple[int, int]) -> Image.Image:
    """Black and white (white = change): the right half and a band across the top."""
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[:, size[0] // 2 :] = 255
    mask[: size[1] // 4] = 255
    return Image.fromarray(mask, mode="L")


def reference_image(path: Path, family: str, height: int, width: int, edit: str | None = None,
                    loras: tuple[tuple[Path, float], ...] = ()) -> Image.Image:
    """REFERENCE_PROMPT at the family's defaults, written out by hand against diffusers' own API
    (computed once per test process: many layouts compare against the same image). `edit`:
    "image-to-image" or "inpaint" with the family's pipeline for it (diffusers' from_pipe), on
    condition_image((width, height)) and edit_mask. `loras`: (adapter folder, scale) pairs, loaded
    with diffusers' load_lora_weights and made active with set_adapters."""
    return _reference_image(path, family, height, width, edit, loras).copy()


@functools.cache
def _reference_image(path: Path, family: str, height: int, width: int, edit: str | None,
                     loras: tuple[tuple[Path, float], ...]) -> Image.Image:
    pipeline = load_plain_pipeline(path)
    for index, (adapter, _) in enumerate(loras):
        pipeline.load_lora_weights(str(adapter), adapter_name=f"adapter{index}")
    if loras:
        pipeline.set_adapters([f"adapter{i}" for i in range(len(loras))], [scale for _, scale in loras])
    if edit is not None:
        pipeline = getattr(diffusers, load_family(family).edit_pipelines[edit]).from_pipe(pipeline)
    arguments = dict(
        prompt=REFERENCE_PROMPT, height=height, width=width, num_inference_steps=REFERENCE_STEPS,
        generator=torch.Generator("cpu").manual_seed(REFERENCE_SEED),
    )
    if family.startswith("qwen-image"):
        arguments.update(negative_prompt=" ", true_cfg_scale=4.0)
    images = condition_images(family) if edit is None else [condition_image((width, height))]
    if images:
        arguments["image"] = images[0] if len(images) == 1 else images
    if edit == "inpaint":
        arguments["mask_image"] = edit_mask((width, height))
    if family == "z-image":
        arguments["guidance_scale"] = 0.0
    if family == "flux":  # FLUX.1-dev's distilled guidance plus true CFG: two DiT calls per step
        arguments.update(guidance_scale=3.5, **FLUX_TRUE_CFG)
    if family == "sd3":
        arguments["guidance_scale"] = 7.0
    with torch.inference_mode():
        return pipeline(**arguments).images[0]


# processes -------------------------------------------------------------------------------------
def alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def rank_context():
    """The multiprocessing context rank processes start from: the fork server the engine's groups
    use, which has imported torch and the rank code once (a process starts in well under a second
    instead of importing them again)."""
    import torch.multiprocessing as mp

    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["workers.worker_process"])
    return context


def run_ranks(target, world_size: int, *args, timeout_s: float = 300, reports: int | None = None) -> list:
    """Run target(rank, world_size, port, *args, results) in `world_size` spawned processes joined
    in one group; `reports` of them (default: every rank) put one item on `results`. The items in
    order of their first element (the rank), or an AssertionError as soon as a rank dies without
    reporting. The benchmarks use it too."""
    import queue

    context = rank_context()
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=target, args=(rank, world_size, port, *args, results))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    received, deadline = [], time.monotonic() + timeout_s
    try:
        while len(received) < (world_size if reports is None else reports):
            try:
                received.append(results.get(timeout=0.5))
            except queue.Empty:
                failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                finished = all(p.exitcode == 0 for p in processes)
                if failed or finished or time.monotonic() > deadline:
                    raise AssertionError(f"ranks did not all report: exit codes {[p.exitcode for p in processes]}")
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    return sorted(received, key=lambda item: item[0])


def wait_until(condition, seconds: float, what: str, poll_s: float = 0.05) -> None:
    """Poll `condition` until it holds; the deadline only bounds a hang, it is not what is tested."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {seconds} s")
        time.sleep(poll_s)


def served(tmp_path_factory, name: str, *args: str):
    """For a fixture: a started `serve` with `args`, logging under a fresh `name` folder; stopped after."""
    server = ServerProcess(list(args)).start(tmp_path_factory.mktemp(name) / "serve.log")
    yield server
    server.stop()


@dataclass
class ServerProcess:
    """A real `serve` process (uvicorn + worker ranks) on a free port."""

    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    health_seen: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_path: Path) -> "ServerProcess":
        """Without the result cache unless `args` size it: a test that sends one request twice
        means to measure the ranks (tests/server/test_step_cache_http.py tests the cache)."""
        self.log_path = log_path
        no_result_cache = [] if "--result-cache-bytes" in self.args else ["--no-result-cache"]
        self.process = subprocess.Popen(
            [SERVE, *self.args, *no_result_cache, "--port", str(self.port)],
            stdout=log_path.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **self.env},
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited with {self.process.returncode}:\n{self.log()[-5000:]}")
            try:
                status = httpx.get(f"{self.url}/health", timeout=2).status_code
                self.health_seen.append(status)
                if status == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"serve did not become ready in {STARTUP_TIMEOUT_S} s:\n{self.log()[-5000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def client(self, **kwargs) -> openai.OpenAI:
        api_key = kwargs.pop("api_key", "unused")
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **kwargs)

    def metric(self, name: str) -> float:
        """Sum of every sample of `name` (all label sets) on /metrics."""
        text = httpx.get(f"{self.url}/metrics").text
        return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))

    def rank_pids(self) -> list[int]:
        """The rank pids of the current worker group, rank 0 first (from /metrics)."""
        text = httpx.get(f"{self.url}/metrics").text
        pids = re.findall(r'^ditserve_rank_pid\{rank="(\d+)"\} (\S+)$', text, re.MULTILINE)
        return [int(float(pid)) for _, pid in sorted(pids, key=lambda item: int(item[0]))]

    def wait_until_running(self, count: int = 1) -> None:
        """Until `count` requests are in the batch on the ranks (an event, not a duration)."""
        wait_until(lambda: self.metric("ditserve_running_requests") >= count, 120, "running")
