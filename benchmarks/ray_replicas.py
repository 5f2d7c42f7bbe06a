"""One server vs replicas on Ray Serve: images/s at 16 concurrent clients, and what the Ray path
adds to one client's latency.

Every server runs tiny/z-image at TP=1 with one core per worker group (OMP_NUM_THREADS=1 for the
plain server; --cpus-per-replica 1 on Ray, which sets the same). "ray x1" is one replica behind
Ray's proxy: the same compute as the plain server, so its latency difference is the Ray path.

    python benchmarks/ray_replicas.py [--size 128] [--steps 9] [--requests 48]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from serve_process import start_server


def request(url: str, args: argparse.Namespace, seed: int) -> float:
    started = time.perf_counter()
    response = httpx.post(f"{url}/v1/images/generations", timeout=600, json={
        "prompt": "a red circle", "size": f"{args.size}x{args.size}", "num_inference_steps": args.steps, "seed": seed})
    response.raise_for_status()
    return time.perf_counter() - started


def measure(name: str, flags: list[str], args: argparse.Namespace) -> dict[str, float]:
    process, url, _ = start_server("tiny/z-image", *flags)
    try:
        for seed in range(5):  # warm: first requests after start-up are slower on either path
            request(url, args, seed)
        single = statistics.median(request(url, args, seed) for seed in range(args.repeats))
        started = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda seed: request(url, args, seed), range(args.requests)))
        return {"single_s": single, "images_per_s": args.requests / (time.perf_counter() - started)}
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--requests", type=int, default=48)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # the plain server's one core (Ray sets it per replica too)
    cases = {"one server": [], "ray x1": ["--replicas", "1", "--ray-address", "local"],
             "ray x2": ["--replicas", "2"]}
    print(f"{'setup':<12}{'1 client s':>12}{'vs one server':>15}{'16 clients img/s':>18}{'speed-up':>10}")
    base = None
    for name, flags in cases.items():
        result = measure(name, flags, args)
        base = base or result
        print(f"{name:<12}{result['single_s']:>12.3f}{result['single_s'] / base['single_s'] - 1:>+15.1%}"
              f"{result['images_per_s']:>18.2f}{result['images_per_s'] / base['images_per_s']:>9.2f}x", flush=True)


if __name__ == "__main__":
    main()
