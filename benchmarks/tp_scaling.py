"""Tensor-parallel scaling of one DiT denoising step on CPU (gloo), printed as a table.

A medium Z-Image-shaped transformer (dim 768, 12 heads, ~80M parameters) with random weights is
written to a temporary diffusers folder; each configuration loads it the way workers do
(sharded safetensors reads) and times the transformer forward at 512x512 (1024 image tokens).

    python benchmarks/tp_scaling.py [--steps 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import diffusers
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from configs import load_family
from engine.worker_group import free_port
from workers import RankLayout, parallel_state
from workers.sharded_loading import dit_component, load_component_shard

MEDIUM_Z_IMAGE = dict(
    all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=768, n_layers=7, n_refiner_layers=2,
    n_heads=12, n_kv_heads=12, cap_feat_dim=768, axes_dims=[16, 24, 24], axes_lens=[1024, 512, 512],
)
IMAGE_SIDE, CAPTION_TOKENS = 512, 64


def write_medium_model(directory: Path) -> int:
    torch.manual_seed(0)
    model = diffusers.ZImageTransformer2DModel(**MEDIUM_Z_IMAGE)
    for token in (model.x_pad_token, model.cap_pad_token):
        torch.nn.init.normal_(token, std=0.02)
    model.save_pretrained(directory / "transformer")
    return sum(p.numel() for p in model.parameters())


def step_inputs() -> tuple:
    generator = torch.Generator().manual_seed(1)
    latent_side = IMAGE_SIDE // 8
    latents = [torch.randn(16, 1, latent_side, latent_side, generator=generator)]
    captions = [torch.randn(CAPTION_TOKENS, MEDIUM_Z_IMAGE["cap_feat_dim"], generator=generator)]
    return latents, torch.tensor([0.5]), captions


def run_rank(rank: int, world_size: int, threads: int, directory: Path, port: int, steps: int, results) -> None:
    torch.set_num_threads(threads)
    parallel_state.initialize(rank, RankLayout(tensor_parallel_size=world_size), "cpu", port)
    model = load_component_shard(
        dit_component(load_family("z-image")), directory / "transformer", rank, world_size, torch.device("cpu"),
        torch.float32,
    )
    latents, timestep, captions = step_inputs()
    with torch.inference_mode():
        model(latents, timestep, captions, return_dict=False)  # warm-up
        parallel_state.reset_collective_counters()
        if world_size > 1:
            dist.barrier()
        started = time.perf_counter()
        for _ in range(steps):
            model(latents, timestep, captions, return_dict=False)
        elapsed = (time.perf_counter() - started) / steps
    calls, sent = parallel_state.collective_counters().get("all_reduce", (0, 0))
    if rank == 0:
        results.put((elapsed, calls / steps, sent / max(calls, 1)))
    parallel_state.shutdown()


def measure(world_size: int, threads: int, directory: Path, steps: int) -> tuple[float, float, float]:
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=run_rank, args=(rank, world_size, threads, directory, port, steps, results))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    outcome = results.get(timeout=1800)
    for process in processes:
        process.join()
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder)
        parameters = write_medium_model(directory)
        print(f"Z-Image-shaped DiT, {parameters / 1e6:.1f}M parameters, {IMAGE_SIDE}x{IMAGE_SIDE}, fp32, CPU, "
              "shared-memory all-reduce")
        rows = []
        for label, world_size, threads in (
            ("TP=1, 1 thread", 1, 1), ("TP=1, 2 threads", 1, 2), ("TP=2, 1 thread/rank", 2, 1),
        ):
            seconds, calls, size = measure(world_size, threads, directory, args.steps)
            rows.append((label, seconds, calls, size))
        baseline = rows[0][1]
        print(f"{'configuration':<22}{'s/step':>9}{'speed-up':>10}{'all-reduces/step':>18}{'MiB/all-reduce':>16}")
        for label, seconds, calls, size in rows:
            print(f"{label:<22}{seconds:>9.3f}{baseline / seconds:>9.2f}x{calls:>18.0f}{size / 2**20:>16.2f}")


if __name__ == "__main__":
    main()
