"""One server vs replicas on Ray Serve: images/s at 16 concurrent clients, and what the Ray path
adds to one client's latency.

Every server runs tiny/z-image at TP=1 with one core per worker group (OMP_NUM_THREADS=1 for the
plain server; --cpus-per-replica 1 on Ray, which sets the same). "ray x1" is one replica behind
Ray's proxy: the same compute as the plain server, so its latency difference is the Ray path.
The 1-client latencies are paired: the plain server and "ray x1" run side by side and take
requests in turn, so drifts of a shared machine's speed hit both alike (both idle while the
other computes; Ray's own idle processes then slow the plain server a little too). Throughput is
measured with one setup running at a time.

    python benchmarks/ray_replicas.py [--size 128] [--steps 9] [--repeats 40] [--requests 48]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
from serve_process import start_server

SETUPS = {"one server": [], "ray x1": ["--replicas", "1", "--ray-address", "local"], "ray x2": ["--replicas", "2"]}


def request(url: str, args: argparse.Namespace, seed: int) -> float:
    started = time.perf_counter()
    response = httpx.post(f"{url}/v1/images/generations", timeout=600, json={
        "prompt": "a red circle", "size": f"{args.size}x{args.size}", "num_inference_steps": args.steps, "seed": seed})
    response.raise_for_status()
    return time.perf_counter() - started


@contextlib.contextmanager
def running(setup: str, args: argparse.Namespace) -> Iterator[str]:
    process, url, _ = start_server("tiny/z-image", *SETUPS[setup])
    try:
        for seed in range(5):  # warm: first requests after start-up are slower on either path
            request(url, args, seed)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)


def paired_latency(args: argparse.Namespace) -> dict[str, float]:
    """Median 1-client seconds of the plain server and of one Ray replica, requests taking turns."""
    with running("one server", args) as plain, running("ray x1", args) as ray:
        times: dict[str, list[float]] = {"one server": [], "ray x1": []}
        for seed in range(args.repeats):
            times["one server"].append(request(plain, args, seed))
            times["ray x1"].append(request(ray, args, seed))
    return {setup: statistics.median(seconds) for setup, seconds in times.items()}


def throughput(setup: str, args: argparse.Namespace) -> float:
    with running(setup, args) as url, ThreadPoolExecutor(16) as pool:
        started = time.perf_counter()
        list(pool.map(lambda seed: request(url, args, seed), range(args.requests)))
        return args.requests / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--requests", type=int, default=48)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # the plain server's one core (Ray sets it per replica too)
    latency = paired_latency(args)
    rates = {setup: throughput(setup, args) for setup in SETUPS}
    print(f"{'setup':<12}{'1 client s':>12}{'vs one server':>15}{'16 clients img/s':>18}{'speed-up':>10}")
    for setup, rate in rates.items():
        single = f"{latency[setup]:>12.3f}{latency[setup] / latency['one server'] - 1:>+15.1%}" \
            if setup in latency else f"{'':>12}{'':>15}"
        print(f"{setup:<12}{single}{rate:>18.2f}{rate / rates['one server']:>9.2f}x", flush=True)


if __name__ == "__main__":
    main()
