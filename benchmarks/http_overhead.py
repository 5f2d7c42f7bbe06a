"""What the HTTP layer costs: `serve` start-up to ready, and a request over HTTP vs in-process Omni.

Starts real `serve` processes (tiny/z-image by default) at TP=1 and TP=2 and times spawn -> /health
200; then runs the same request sequentially through the OpenAI SDK and through `Omni` and
prints median latencies and their ratio.

    python benchmarks/http_overhead.py [--model tiny/z-image] [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import openai
from serve_process import start_server

from engine import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams

CASES = [(64, 1), (128, 9)]  # (side, steps)


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny/z-image")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    http_times = {}
    for tp in (1, 2):
        process, url, ready_s = start_server(args.model, "--tensor-parallel-size", str(tp))
        print(f"serve {args.model} --tensor-parallel-size {tp}: ready after {ready_s:.2f} s")
        if tp == 1:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            for side, steps in CASES:
                http_times[side, steps] = median_seconds(lambda: client.images.generate(
                    prompt="a cat", size=f"{side}x{side}", extra_body={"seed": 1, "num_inference_steps": steps}),
                    args.repeats)
        process.terminate()
        process.wait()

    with Omni(model=args.model, parallel_config=DiffusionParallelConfig(tensor_parallel_size=1)) as omni:
        print(f"\n| {'request':<18} | {'HTTP (s)':>9} | {'Omni (s)':>9} | {'HTTP/Omni':>9} |")
        print(f"|{'-' * 20}|{'-' * 11}|{'-' * 11}|{'-' * 11}|")
        for side, steps in CASES:
            params = OmniDiffusionSamplingParams(seed=1, num_inference_steps=steps, height=side, width=side)
            omni_s = median_seconds(lambda: omni.generate("a cat", params), args.repeats)
            http_s = http_times[side, steps]
            label = f"{side}x{side}, {steps} steps"
            print(f"| {label:<18} | {http_s:9.3f} | {omni_s:9.3f} | {http_s / omni_s:8.2f}x |")


if __name__ == "__main__":
    main()
