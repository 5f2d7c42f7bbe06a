"""The server under load and faults: concurrency with batching, 429, disconnects, rank deaths, SIGTERM."""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.server.conftest import ServerProcess


def generate(server: ServerProcess, timeout: float = 120, **fields) -> httpx.Response:
    body = {"prompt": "a cat", "size": "64x64", "num_inference_steps": 2, **fields}
    return httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=timeout)


def pixels(response: httpx.Response) -> np.ndarray:
    data = base64.b64decode(response.json()["data"][0]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def metric(server: ServerProcess, name: str) -> float:
    """Sum of every sample of `name` (all label sets) on /metrics."""
    text = httpx.get(f"{server.url}/metrics").text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))


def rank_pids(server: ServerProcess) -> list[int]:
    lines = re.findall(r"rank pids ([\d, \[\]]+)", server.log())
    return [int(pid) for pid in re.findall(r"\d+", lines[-1])]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_healthy(server: ServerProcess, seconds: float = 120) -> list[int]:
    seen, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.append(httpx.get(f"{server.url}/health").status_code)
        if seen[-1] == 200:
            return seen
        time.sleep(0.1)
    raise AssertionError(f"not healthy again within {seconds} s:\n{server.log()[-3000:]}")


def test_sixteen_concurrent_clients_each_get_their_own_image(z_image_server: ServerProcess):
    images_before = metric(z_image_server, "ditserve_images_generated_total")
    ok_before = metric(z_image_server, 'ditserve_requests_total{route="generations",status="200"}')
    jobs = [dict(prompt=f"picture number {i}", seed=500 + i) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda job: generate(z_image_server, **job), jobs))
    assert [r.status_code for r in together] == [200] * 16
    assert [r.json()["seed"] for r in together] == [job["seed"] for job in jobs]
    # Batches formed (default --max-batch-size 8), and batching changed no image.
    assert metric(z_image_server, "ditserve_batch_images_sum") > metric(z_image_server, "ditserve_batch_images_count")
    for job, response in zip(jobs, together):
        alone = generate(z_image_server, **job)
        assert np.abs(pixels(response) - pixels(alone)).max() <= 1, job
    assert metric(z_image_server, "ditserve_images_generated_total") == images_before + 32
    assert metric(z_image_server, 'ditserve_requests_total{route="generations",status="200"}') == ok_before + 32
    assert "batch=" in z_image_server.log() and "queue_wait=" in z_image_server.log()


@pytest.fixture(scope="module")
def narrow_server(tmp_path_factory):
    """Batching off and room for only two admitted requests."""
    server = ServerProcess(["tiny/z-image", "--max-batch-size", "1", "--max-queue-size", "2"])
    server.start(tmp_path_factory.mktemp("narrow") / "serve.log")
    yield server
    server.stop()


def test_beyond_the_queue_bound_requests_get_429_and_the_rest_succeed(narrow_server: ServerProcess):
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: generate(narrow_server, seed=i, num_inference_steps=20, size="128x128"),
                                  range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 429} and statuses.count(200) >= 2, statuses
    for response in responses:
        if response.status_code == 429:
            assert response.json()["error"]["code"] == "queue_full"
            assert response.headers["retry-after"] == "1" and response.headers["x-should-retry"] == "true"
        else:
            assert pixels(response).shape == (128, 128, 3)


def test_a_client_disconnect_frees_the_worker_within_a_step(narrow_server: ServerProcess):
    cancelled_before = metric(narrow_server, "ditserve_requests_cancelled_total")

    def abandoned():  # ~200 steps of several tens of ms each; the client gives up after 1 s
        with pytest.raises(httpx.ReadTimeout):
            generate(narrow_server, timeout=1.0, num_inference_steps=200, size="512x512", seed=1)

    thread = threading.Thread(target=abandoned)
    thread.start()
    thread.join()
    step_s = metric(narrow_server, "ditserve_step_seconds_sum") / max(1, metric(narrow_server, "ditserve_step_seconds_count"))
    started = time.perf_counter()
    quick = generate(narrow_server, num_inference_steps=1)
    waited = time.perf_counter() - started
    assert quick.status_code == 200
    assert waited < 2.0, f"next request took {waited:.2f} s: the abandoned one kept the worker"
    assert metric(narrow_server, "ditserve_requests_cancelled_total") == cancelled_before + 1
    assert "status=499" in narrow_server.log()
    queue_wait = float(re.findall(r"queue_wait=([\d.]+)s", narrow_server.log())[-1])
    assert queue_wait < 0.5 + 2 * step_s, (queue_wait, step_s)


@pytest.fixture(scope="module")
def tp2_server(tmp_path_factory):
    server = ServerProcess(["tiny/z-image", "--tensor-parallel-size", "2"])
    server.start(tmp_path_factory.mktemp("tp2") / "serve.log")
    yield server
    server.stop()


@pytest.mark.parametrize("victim", ["follower", "driver"])
def test_a_killed_rank_fails_in_flight_work_promptly_then_the_group_restarts(tp2_server: ServerProcess, victim):
    pids = rank_pids(tp2_server)
    restarts_before = metric(tp2_server, "ditserve_worker_restarts_total")
    outcome = {}

    def long_request():
        started = time.perf_counter()
        outcome["response"] = generate(tp2_server, num_inference_steps=200, size="256x256")
        outcome["finished"] = time.perf_counter() - started

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(1.0)
    killed_at = time.perf_counter()
    os.kill(pids[1] if victim == "follower" else pids[0], signal.SIGKILL)
    thread.join(timeout=30)
    assert not thread.is_alive()
    response = outcome["response"]
    assert response.status_code == 503 and response.json()["error"]["code"] == "worker_died"
    assert response.headers["x-should-retry"] == "true"
    assert time.perf_counter() - killed_at < 5.0
    wait_healthy(tp2_server)
    assert metric(tp2_server, "ditserve_worker_restarts_total") == restarts_before + 1
    assert not any(alive(pid) for pid in pids)
    assert generate(tp2_server).status_code == 200


def test_sigterm_finishes_admitted_work_then_exits_zero_with_no_orphans(tp2_server: ServerProcess):
    pids = rank_pids(tp2_server)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("r", generate(
        tp2_server, num_inference_steps=30, size="128x128")))
    thread.start()
    time.sleep(0.5)
    tp2_server.process.send_signal(signal.SIGTERM)
    thread.join(timeout=60)
    assert outcome["r"].status_code == 200 and pixels(outcome["r"]).shape == (128, 128, 3)
    assert tp2_server.process.wait(timeout=60) == 0
    with pytest.raises(httpx.TransportError):
        generate(tp2_server)
    assert not any(alive(pid) for pid in pids)
