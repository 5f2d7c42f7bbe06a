"""Load generator: images/s and latency of a running `serve` at several concurrencies, batching on and off.

For each model (tiny/z-image at 64x64, and a medium Z-Image-shaped DiT of ~20M parameters at
256x256) and each --max-batch-size (1 = off, 16 = on) the script starts `serve`, then sends
requests from 1, 4 and 16 concurrent clients and prints one table.

    python benchmarks/serving.py [--requests-per-client 4]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import diffusers
import httpx
import torch
from serve_process import start_server

from engine.models.tiny_models import write_tiny_model

CONCURRENCY = (1, 4, 16)
BATCH_SIZES = (1, 16)
MEDIUM_TRANSFORMER = dict(
    all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=512, n_layers=4, n_refiner_layers=1,
    n_heads=8, n_kv_heads=8, cap_feat_dim=32, axes_dims=[16, 24, 24], axes_lens=[1024, 512, 512],
)


def write_medium_model(directory: Path) -> Path:
    """tiny/z-image with its DiT replaced by a wider, deeper one (text encoder and VAE stay tiny)."""
    write_tiny_model("z-image", directory)
    torch.manual_seed(0)
    transformer = diffusers.ZImageTransformer2DModel(**MEDIUM_TRANSFORMER)
    for token in (transformer.x_pad_token, transformer.cap_pad_token):
        torch.nn.init.normal_(token, std=0.02)
    for stale in (directory / "transformer").iterdir():
        stale.unlink()
    transformer.save_pretrained(directory / "transformer")
    return directory


async def run_load(url: str, concurrency: int, per_client: int, body: dict) -> tuple[float, float, float]:
    """(images/s, p50 s, p95 s) for `concurrency` clients each sending `per_client` requests back to back."""
    latencies: list[float] = []

    async def client(index: int, http: httpx.AsyncClient) -> None:
        for k in range(per_client):
            started = time.perf_counter()
            response = await http.post(f"{url}/v1/images/generations", json={**body, "seed": index * 1000 + k})
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    return len(latencies) / elapsed, statistics.median(latencies), p95


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests-per-client", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        models = [
            ("tiny/z-image", "tiny/z-image", {"size": "64x64", "num_inference_steps": 4}),
            ("medium z-image (20M)", str(write_medium_model(Path(scratch) / "medium")),
             {"size": "256x256", "num_inference_steps": 4}),
        ]
        print(f"| {'model':<20} | batch | clients | images/s | p50 (s) | p95 (s) |")
        print(f"|{'-' * 22}|-------|---------|----------|---------|---------|")
        for label, model, body in models:
            for max_batch in BATCH_SIZES:
                process, url, _ = start_server(model, "--max-batch-size", str(max_batch))
                try:
                    asyncio.run(run_load(url, 2, 1, {"prompt": "warm", **body}))  # page in both paths
                    for concurrency in CONCURRENCY:
                        rate, p50, p95 = asyncio.run(run_load(
                            url, concurrency, args.requests_per_client, {"prompt": "a cat", **body}))
                        head = f"| {label:<20} | {max_batch:>5} | {concurrency:>7} |"
                        print(f"{head} {rate:8.2f} | {p50:7.3f} | {p95:7.3f} |", flush=True)
                finally:
                    process.terminate()
                    process.wait()


if __name__ == "__main__":
    main()
