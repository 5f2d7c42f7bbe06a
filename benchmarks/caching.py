"""Step caching on `builtin/shapes`: work saved, speed, and how far the picture moves.

For each backend setting, the held-out prompts of benchmarks/shapes_quality.py (the first
--prompts of them, one seed each) run through `Omni` at --steps, side by side with the uncached
run in the same process. Columns: steps whose blocks were skipped or predicted; the share of
block-stack evaluations saved (first-block cache: all blocks but the first, on a cached step;
MagCache: every block; TaylorSeer predicts attention only, so its saving is below its cached share); wall-clock speed-up
over uncached (median of --repeats); PSNR and max pixel error against the uncached images; the
judge's colour+position accuracy, uncached first.

    python benchmarks/caching.py [--steps 30 50] [--prompts 24] [--tp 1] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ and benchmarks/ are the repository's

from benchmarks.shapes_quality import MODEL, held_out_scenes  # noqa: E402
from engine import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams, resolve_model  # noqa: E402
from tools.shapes.judge import judge, score  # noqa: E402

SETTINGS = [  # (label, backend, config)
    ("none", "none", {}),
    ("FBC 0.05", "first_block_cache", {"threshold": 0.05}),
    ("FBC 0.10", "first_block_cache", {"threshold": 0.10}),
    ("FBC 0.20", "first_block_cache", {"threshold": 0.20, "max_cached_steps": 5}),
    ("TaylorSeer 2", "taylorseer", {"cache_interval": 2}),
    ("TaylorSeer 3", "taylorseer", {"cache_interval": 3}),
    ("MagCache 0.06", "magcache", {"threshold": 0.06}),
    ("MagCache 0.12", "magcache", {"threshold": 0.12, "max_cached_steps": 4}),
    ("MagCache 0.24", "magcache", {"threshold": 0.24, "max_cached_steps": 6}),
]


def run(backend: str, config: dict, tp: int, captions: list[str], steps: int, repeats: int):
    """(images, cached steps per image, seconds per repeat) for one setting."""
    with Omni(model=MODEL, parallel_config=DiffusionParallelConfig(tensor_parallel_size=tp),
              cache_backend=backend, cache_config=config) as omni:
        omni.generate(captions[0], OmniDiffusionSamplingParams(seed=0, num_inference_steps=2, cache="off"))  # warm
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            outputs = omni.generate(captions, OmniDiffusionSamplingParams(seed=0, num_inference_steps=steps))
            seconds.append(time.perf_counter() - started)
    images = [np.asarray(o.images[0].convert("RGB"), dtype=np.float64) for o in outputs]
    return images, [o.timings.get("cached_steps", 0) for o in outputs], seconds


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    error = np.mean((a - b) ** 2)
    return float("inf") if error == 0 else 10 * np.log10(255**2 / error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[30, 50])
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    scenes = held_out_scenes()[: args.prompts]
    captions = [scene.caption() for scene in scenes]
    blocks = json.loads((resolve_model(MODEL).path / "transformer" / "config.json").read_text())["n_layers"]
    print(f"{MODEL}, {len(scenes)} held-out prompts, TP={args.tp}, CPU; speed-up: median of {args.repeats}")
    for steps in args.steps:
        print(f"\n{steps} steps\n")
        print("| setting | steps cached | block evaluations saved | speed-up | PSNR vs uncached (dB) | "
              "max pixel error | colour+position |")
        print("|---|---|---|---|---|---|---|")
        baseline = None
        for label, backend, config in SETTINGS:
            images, cached, seconds = run(backend, config, args.tp, captions, steps, args.repeats)
            accuracy = np.mean([score(s, judge(i.astype(np.uint8))).colour_and_position
                                for s, i in zip(scenes, images)])
            if baseline is None:
                baseline = (images, statistics.median(seconds))
            share = sum(cached) / (steps * len(images))
            saved = {"first_block_cache": share * (blocks - 1) / blocks, "magcache": share}.get(backend)
            quality = [psnr(a, b) for a, b in zip(images, baseline[0])]
            print(f"| {label} | {share:.0%} | {'-' if saved is None else f'{saved:.0%}'} | "
                  f"{baseline[1] / statistics.median(seconds):.2f}x | {statistics.median(quality):.1f} | "
                  f"{max(np.abs(a - b).max() for a, b in zip(images, baseline[0])):.0f} | {accuracy:.0%} |",
                  flush=True)


if __name__ == "__main__":
    main()
