"""What --text-encoder-offload / --vae-offload cost: median request latency with each model kept
on the offload device between uses, against keeping everything on the rank's device.

Each use copies the model to the rank's device and back, so the added time is about
2 x (model bytes) / (host-device bandwidth) per request on a GPU; on a CPU-only machine the "move"
is to the same device and the table shows only the wrapper's own overhead. At true size without
weights on a GPU machine:

    python benchmarks/offload.py --model Qwen/Qwen-Image --load-format dummy --tp 4 --size 1024
    python benchmarks/offload.py            # builtin/shapes on this machine
"""

from __future__ import annotations

import argparse
import statistics
import time

from engine import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams
from engine.memory_report import format_size

SETTINGS = {"none": {}, "text encoders": {"text_encoder_offload": "cpu"}, "vae": {"vae_offload": "cpu"},
            "both": {"text_encoder_offload": "cpu", "vae_offload": "cpu"}}


def measure(args: argparse.Namespace, offload: dict[str, str]) -> tuple[float, dict[str, int]]:
    params = OmniDiffusionSamplingParams(num_inference_steps=args.steps, height=args.size, width=args.size, seed=1)
    with Omni(model=args.model, parallel_config=DiffusionParallelConfig(tensor_parallel_size=args.tp),
              load_format=args.load_format, **offload) as omni:
        omni.generate("a red circle", params)  # warm
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            omni.generate("a red circle", params)
            seconds.append(time.perf_counter() - started)
        return statistics.median(seconds), omni.rank_parameter_bytes()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin/shapes")
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{'offloaded':<15}{'bytes moved/request':>21}{'median s':>10}{'added s':>9}{'added':>8}")
    base = None
    for name, offload in SETTINGS.items():
        seconds, held = measure(args, offload)
        base = seconds if base is None else base
        moved = sum(size for component, size in held.items()
                    if (component.startswith("text_encoder") and "text_encoder_offload" in offload)
                    or (component == "vae" and "vae_offload" in offload))
        print(f"{name:<15}{format_size(2 * moved):>21}{seconds:>10.3f}{seconds - base:>9.3f}"
              f"{(seconds - base) / base:>8.1%}", flush=True)


if __name__ == "__main__":
    main()
