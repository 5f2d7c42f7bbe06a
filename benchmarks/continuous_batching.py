"""Request vs continuous scheduling under open-loop Poisson arrivals, side by side in one process.

For each model, one AsyncEngine per scheduling (`--scheduling request` and `continuous`, the same
options otherwise) serves the same arrival schedule: --requests requests cycling through
steps 4 / 9 / 30 and n 1 / 1 / 2, arriving as a Poisson process at 50%, 70% and 90% of the
capacity measured first (the mix run back to back under request scheduling). Columns: p50 and p99
latency (admission to images), throughput (requests per second from the first arrival to the last
answer), the mean rows per DiT forward (continuous) or images per pipeline call (request), and the
ratio of continuous to request p99: medians over --repeats, with [min-max] of the p99s and of the
ratio (each repeat runs both schedulings back to back on one arrival schedule). A last table: a
4-step request sent while a --long-steps one runs (after its first preview), its latency under
each scheduling.

    python benchmarks/continuous_batching.py [--models tiny/z-image builtin/shapes] [--requests 24]
                                             [--loads 0.5 0.7 0.9] [--repeats 1] [--long-steps 60]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import AsyncEngine, EngineConfig, OmniDiffusionSamplingParams, PromptInput  # noqa: E402

MIX = [(4, 1), (9, 1), (30, 2)]  # (steps, n), cycled
PROMPTS = ["a small red circle at the top left on a white background",
           "a large blue square in the centre on a yellow background",
           "a small green triangle on the right on a black background"]
SIDES = {"tiny/z-image": 64}  # others: the model's default size


def params(model: str, index: int, seed: int) -> OmniDiffusionSamplingParams:
    steps, n = MIX[index % len(MIX)]
    side = SIDES.get(model)
    size = {"height": side, "width": side} if side else {}
    return OmniDiffusionSamplingParams(num_inference_steps=steps, num_outputs_per_prompt=n, seed=seed, **size)


async def start(model: str, scheduling: str) -> AsyncEngine:
    engine = AsyncEngine(EngineConfig(model=model, scheduling=scheduling, result_cache_bytes=0,
                                      prompt_cache_bytes=0, max_queue_size=256))
    loaded = asyncio.Event()
    await engine.start(on_loaded=loaded.set)
    await loaded.wait()
    if not engine.healthy:
        raise SystemExit(f"{model} ({scheduling}) did not start: {engine.failure}")
    return engine


async def capacity(engine: AsyncEngine, model: str) -> float:
    """Requests per second of the mix run back to back (one at a time)."""
    started = time.perf_counter()
    for index in range(len(MIX) * 2):
        await engine.generate(PromptInput(PROMPTS[index % 3]), params(model, index, index))
    return len(MIX) * 2 / (time.perf_counter() - started)


async def open_loop(engine: AsyncEngine, model: str, rate: float, count: int, seed: int) -> dict:
    rng = random.Random(seed)
    arrivals, clock = [], 0.0
    for _ in range(count):
        clock += rng.expovariate(rate)
        arrivals.append(clock)
    before = _batch_sizes(engine)
    origin = time.perf_counter()

    async def one(index: int, at: float) -> tuple[float, float]:
        await asyncio.sleep(max(0.0, origin + at - time.perf_counter()))
        sent = time.perf_counter()
        await engine.generate(PromptInput(PROMPTS[index % 3]), params(model, index, 1000 + index))
        done = time.perf_counter()
        return done - sent, done

    results = await asyncio.gather(*(one(index, at) for index, at in enumerate(arrivals)))
    latencies = sorted(latency for latency, _ in results)
    span = max(done for _, done in results) - (origin + arrivals[0])
    after = _batch_sizes(engine)
    rows = (after[0] - before[0]) / max(after[1] - before[1], 1)
    return {"p50": statistics.median(latencies), "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "throughput": count / span, "rows": rows}


def _batch_sizes(engine: AsyncEngine) -> tuple[float, float]:
    """(sum, count) of rows per DiT forward (continuous) or images per pipeline call (request)."""
    registry = engine.metrics.registry
    name = "ditserve_forward_rows" if engine.scheduler.continuous else "ditserve_batch_images"
    return (registry.get_sample_value(f"{name}_sum") or 0.0, registry.get_sample_value(f"{name}_count") or 0.0)


async def short_during_long(engine: AsyncEngine, model: str, long_steps: int) -> float:
    previewed = asyncio.Event()
    size = {"height": SIDES[model], "width": SIDES[model]} if model in SIDES else {}
    long = asyncio.ensure_future(engine.generate(
        PromptInput(PROMPTS[0]), OmniDiffusionSamplingParams(num_inference_steps=long_steps, partial_images=3, seed=1,
                                                             **size), on_partial=lambda _: previewed.set()))
    await previewed.wait()
    sent = time.perf_counter()
    await engine.generate(PromptInput(PROMPTS[1]), OmniDiffusionSamplingParams(num_inference_steps=4, seed=2, **size))
    latency = time.perf_counter() - sent
    await long
    return latency


async def main(args: argparse.Namespace) -> None:
    print(f"# continuous vs request scheduling; mix (steps, n) {MIX}; {args.requests} requests per run; "
          f"median of {args.repeats} repeat(s)")
    short_rows = []
    for model in args.models:
        engines = {mode: await start(model, mode) for mode in ("request", "continuous")}
        try:
            rate = await capacity(engines["request"], model)
            print(f"\n## {model}: capacity {rate:.2f} req/s (request scheduling, one at a time)\n")
            print("| load | scheduling | p50 s | p99 s [min-max] | throughput req/s | mean rows per forward | "
                  "p99 vs request [min-max] |")
            print("|---|---|---|---|---|---|---|")
            for load in args.loads:
                runs = {mode: [] for mode in engines}
                for repeat in range(args.repeats):
                    for mode, engine in engines.items():  # side by side: the same schedule, one after the other
                        runs[mode].append(await open_loop(engine, model, load * rate, args.requests, repeat))
                medians = {mode: {key: statistics.median(run[key] for run in results) for key in results[0]}
                           for mode, results in runs.items()}
                for mode, row in medians.items():
                    p99s = [run["p99"] for run in runs[mode]]
                    ratios = [mine["p99"] / theirs["p99"] for mine, theirs in zip(runs[mode], runs["request"])]
                    print(f"| {load:.0%} | {mode} | {row['p50']:.2f} | {row['p99']:.2f} "
                          f"[{min(p99s):.2f}-{max(p99s):.2f}] | {row['throughput']:.2f} | {row['rows']:.2f} | "
                          f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}] |")
            latencies = {mode: await short_during_long(engine, model, args.long_steps)
                         for mode, engine in engines.items()}
            short_rows.append((model, latencies))
        finally:
            for engine in engines.values():
                await engine.shutdown()
    print(f"\n## a 4-step request sent while a {args.long_steps}-step one runs\n")
    print("| model | request s | continuous s | continuous / request |")
    print("|---|---|---|---|")
    for model, latencies in short_rows:
        print(f"| {model} | {latencies['request']:.2f} | {latencies['continuous']:.2f} | "
              f"{latencies['continuous'] / latencies['request']:.2f}x |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny/z-image", "builtin/shapes"])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--long-steps", type=int, default=60)
    asyncio.run(main(parser.parse_args()))
