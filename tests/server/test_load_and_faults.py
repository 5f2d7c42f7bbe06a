"""The server under load and faults: concurrency with batching, 429, disconnects, rank deaths, SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.helpers import ServerProcess, alive, b64_pixels, served, wait_until

# Four 1024x1024 images for 200 steps: minutes of work on this machine, so a request that stops
# within the bounds below (a few steps' time, at least 10x what stopping takes) was really cancelled.
LONG = dict(num_inference_steps=200, size="1024x1024", n=4)
STOP_BOUND_S = 15.0


def generate(server: ServerProcess, timeout: float = 300, **fields) -> httpx.Response:
    body = {"prompt": "a cat", "size": "64x64", "num_inference_steps": 2, **fields}
    return httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=timeout)


def pixels(response: httpx.Response) -> np.ndarray:
    return b64_pixels(response.json()["data"][0]["b64_json"])


def wait_healthy(server: ServerProcess, seconds: float = 120) -> None:
    wait_until(lambda: httpx.get(f"{server.url}/health").status_code == 200, seconds, "healthy again", poll_s=0.1)


def test_sixteen_concurrent_clients_each_get_their_own_image(z_image_server: ServerProcess):
    images_before = z_image_server.metric("ditserve_images_generated_total")
    ok_before = z_image_server.metric('ditserve_requests_total{route="generations",status="200"}')
    jobs = [dict(prompt=f"picture number {i}", seed=500 + i) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda job: generate(z_image_server, **job), jobs))
    assert [r.status_code for r in together] == [200] * 16
    assert [r.json()["seed"] for r in together] == [job["seed"] for job in jobs]
    # Batches formed (default --max-batch-size 8), and batching changed no image.
    assert z_image_server.metric("ditserve_batch_images_sum") > z_image_server.metric("ditserve_batch_images_count")
    for job, response in zip(jobs, together):
        alone = generate(z_image_server, **job)
        assert np.abs(pixels(response) - pixels(alone)).max() <= 1, job
    assert z_image_server.metric("ditserve_images_generated_total") == images_before + 32
    assert z_image_server.metric('ditserve_requests_total{route="generations",status="200"}') == ok_before + 32
    assert "batch=" in z_image_server.log() and "queue_wait=" in z_image_server.log()


@pytest.fixture(scope="module")
def narrow_server(tmp_path_factory):
    """Batching off and room for only two admitted requests."""
    yield from served(tmp_path_factory, "narrow", "tiny/z-image", "--max-batch-size", "1", "--max-queue-size", "2")


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
    cancelled_before = narrow_server.metric("ditserve_requests_cancelled_total")
    payload = json.dumps({"prompt": "a cat", "seed": 1, **LONG}).encode()
    with socket.create_connection(("127.0.0.1", narrow_server.port)) as connection:
        connection.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        narrow_server.wait_until_running()
    # the client hung up before any answer came
    started = time.perf_counter()
    quick = generate(narrow_server, num_inference_steps=1)
    waited = time.perf_counter() - started
    assert quick.status_code == 200
    assert waited < STOP_BOUND_S, f"next request took {waited:.2f} s: the abandoned one kept the worker"
    wait_until(lambda: narrow_server.metric("ditserve_requests_cancelled_total") == cancelled_before + 1, 30, "counted")
    wait_until(lambda: "status=499" in narrow_server.log(), 30, "logged")
    queue_wait = float(re.findall(r"queue_wait=([\d.]+)s", narrow_server.log())[-1])
    assert queue_wait < STOP_BOUND_S, queue_wait


@pytest.fixture(scope="module")
def hybrid_server(tmp_path_factory):
    """Four ranks: TP=2 inside each of two Ulysses ranks, every rank busy at every step."""
    yield from served(tmp_path_factory, "hybrid", "tiny/z-image", "--tensor-parallel-size", "2", "--usp", "2")


def test_the_layout_is_on_metrics_and_in_the_ready_line(hybrid_server: ServerProcess):
    assert [hybrid_server.metric(f'ditserve_parallel_size{{axis="{axis}"}}') for axis in ("tp", "ulysses", "cfg")] \
        == [2, 2, 1]
    assert "tensor_parallel_size=2 x ulysses_degree=2 (4 ranks)" in hybrid_server.log()


@pytest.mark.parametrize("victim", ["follower", "driver"])
def test_a_killed_rank_fails_in_flight_work_promptly_then_the_group_restarts(hybrid_server: ServerProcess, victim):
    pids = hybrid_server.rank_pids()
    assert len(pids) == 4
    restarts_before = hybrid_server.metric("ditserve_worker_restarts_total")
    outcome = {}

    def long_request():
        outcome["response"] = generate(hybrid_server, **LONG)

    thread = threading.Thread(target=long_request)
    thread.start()
    hybrid_server.wait_until_running()
    killed_at = time.perf_counter()
    os.kill(pids[-1] if victim == "follower" else pids[0], signal.SIGKILL)  # the follower on the other axes
    thread.join(timeout=120)
    assert not thread.is_alive()
    failed_after = time.perf_counter() - killed_at
    response = outcome["response"]
    assert response.status_code == 503 and response.json()["error"]["code"] == "worker_died"
    assert response.headers["x-should-retry"] == "true"
    assert failed_after < STOP_BOUND_S
    wait_healthy(hybrid_server)
    assert hybrid_server.metric("ditserve_worker_restarts_total") == restarts_before + 1
    assert not any(alive(pid) for pid in pids)
    assert generate(hybrid_server).status_code == 200


def test_sigterm_finishes_admitted_work_then_exits_zero_with_no_orphans(hybrid_server: ServerProcess):
    pids = hybrid_server.rank_pids()
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("r", generate(
        hybrid_server, num_inference_steps=30, size="128x128")))
    thread.start()
    hybrid_server.wait_until_running()
    hybrid_server.process.send_signal(signal.SIGTERM)
    thread.join(timeout=120)
    assert outcome["r"].status_code == 200 and pixels(outcome["r"]).shape == (128, 128, 3)
    assert hybrid_server.process.wait(timeout=60) == 0
    with pytest.raises(httpx.TransportError):
        generate(hybrid_server)
    assert not any(alive(pid) for pid in pids)
    assert "leaked" not in hybrid_server.log()
