"""Compiled vs eager DiT blocks on CPU, printed as one table per family.

The medium DiTs of benchmarks/parallel_modes.py (Z-Image-shaped: one call per step; Qwen-Image-
shaped: true CFG, two calls per step) at 512x512, fp32, one thread per rank, started the way
workers start them. Per layout the runs alternate eager, compiled, --repeats times, each timing
--steps steps after one warm-up step; the first compiled run starts with an empty compile cache
(cold), the others read it (warm starts). Speed-up is eager over compiled of each pair (median,
and each). Compile seconds are the first step's tracing and compiling on rank 0 (torch._dynamo's
own timer), cold and the median warm.

Then where an eager step's time goes at TP=1 (torch.profiler, self CPU time): the share of matrix
products and attention, which inductor leaves to the same kernels; 1 / that share bounds what
compiling the rest can give.

    python benchmarks/compile.py [--steps 4] [--repeats 3] [--families z-image qwen-image]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import diffusers
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ is the repository's, not installed

from benchmarks.parallel_modes import IMAGE_SIDE, step_calls, write_medium_model  # noqa: E402
from benchmarks.parallel_modes import measure as measure_layout  # noqa: E402
from configs import load_family  # noqa: E402
from workers import RankLayout  # noqa: E402

LAYOUTS = [("TP=1", RankLayout()), ("TP=2", RankLayout(tensor_parallel_size=2)),
           ("Ulysses=2", RankLayout(ulysses_degree=2))]
KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu")


def kernel_share(family: str, directory: Path) -> float:
    """The share of an eager TP=1 step (one thread) spent in matrix products and attention."""
    torch.set_num_threads(1)
    model = getattr(diffusers, load_family(family).transformer_class).from_pretrained(directory / family /
                                                                                       "transformer").eval()
    calls = step_calls(family)
    with torch.inference_mode():
        for args, kwargs in calls:  # warm
            model(*args, **kwargs)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            for args, kwargs in calls:
                model(*args, **kwargs)
    events = profile.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    return sum(event.self_cpu_time_total for event in events if event.key in KERNELS) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--families", nargs="+", default=["z-image", "qwen-image"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder)
        for family in args.families:
            parameters = write_medium_model(family, directory)
            print(f"\n{family}-shaped DiT, {parameters / 1e6:.0f}M parameters, {IMAGE_SIDE}x{IMAGE_SIDE}, fp32, CPU, "
                  f"one thread per rank, {args.steps} timed steps\n")
            print("| layout | eager s/step | compiled s/step | speed-up (median; runs) | compile cold | compile warm "
                  "| warm / cold | graphs | graph breaks |")
            print("|---|---|---|---|---|---|---|---|---|")
            for label, layout in LAYOUTS:
                cache = tempfile.mkdtemp(dir=folder)
                eager, compiled = [], []
                for _ in range(args.repeats):
                    eager.append(measure_layout(family, layout, 1, directory, args.steps))
                    compiled.append(measure_layout(family, layout, 1, directory, args.steps, compile_cache_dir=cache))
                ratios = [e.seconds / c.seconds for e, c in zip(eager, compiled)]
                cold = compiled[0].compile
                warm = statistics.median(c.compile.seconds for c in compiled[1:])
                print(f"| {label} | {statistics.median(e.seconds for e in eager):.3f} | "
                      f"{statistics.median(c.seconds for c in compiled):.3f} | {statistics.median(ratios):.2f}x; "
                      f"{', '.join(f'{r:.2f}x' for r in ratios)} | {cold.seconds:.1f} s | {warm:.1f} s | "
                      f"{warm / cold.seconds:.0%} | {cold.graphs} ({compiled[-1].compile.cache_hits} read from the "
                      f"cache warm) | {cold.graph_breaks} |", flush=True)
            share = kernel_share(family, directory)
            print(f"\nEager TP=1 step: {share:.0%} in matrix products and attention; compiling the rest can give "
                  f"at most {1 / share:.2f}x.", flush=True)


if __name__ == "__main__":
    main()
