"""Step caching on `builtin/shapes`: work saved, speed, and how far the picture moves.

For each backend setting, the held-out prompts of benchmarks/shapes_quality.py (the first
--prompts of them, one seed each) run through `Omni` at --steps, side by side with the uncached
run in the same process. Columns: steps whose blocks were skipped or predicted; the share of
block-stack evaluations saved (first-block cache: all blocks but the first, on a cached step;
MagCache: every block; TaylorSeer predicts attention only, so its saving is below its cached share); wall-clock speed-up
over uncached (median of --repeats); PSNR and max pixel error against the uncached images; the
judge's colour+position accuracy, uncached first.

A second table shows the saving survives tensor parallelism: the medium Z-Image-shaped DiT of
benchmarks/parallel_modes.py (512x512, one call per step) run for --dit-steps steps at TP=1 and
TP=2, uncached and with one fixed step mask (MagCache with a ratio of one at every step, so the
same steps are skipped in both layouts, whatever the numbers).

    python benchmarks/caching.py [--steps 30 50] [--prompts 24] [--tp 1] [--repeats 1] [--dit-steps 12]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ and benchmarks/ are the repository's

from benchmarks.parallel_modes import measure, write_medium_model  # noqa: E402
from benchmarks.shapes_quality import MODEL, held_out_scenes  # noqa: E402
from configs import CacheSettings  # noqa: E402
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
    parser.add_argument("--dit-steps", type=int, default=12, help="the TP table's steps (0: no TP table)")
    args = parser.parse_args()
    scenes = held_out_scenes()[: args.prompts]
    captions = [scene.caption() for scene in scenes]
    blocks = json.loads((resolve_model(MODEL).path / "transformer" / "config.json").read_text())["n_layers"]
    print(f"{MODEL}, {len(scenes)} held-out prompts, TP={args.tp}, CPU; speed-up: uncached median over each "
          f"repeat's time, median (min-max) of {args.repeats}")
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
            ratios = sorted(baseline[1] / second for second in seconds)
            spread = f" ({ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else ""
            print(f"| {label} | {share:.0%} | {'-' if saved is None else f'{saved:.0%}'} | "
                  f"{statistics.median(ratios):.2f}x{spread} | {statistics.median(quality):.1f} | "
                  f"{max(np.abs(a - b).max() for a, b in zip(images, baseline[0])):.0f} | {accuracy:.0%} |",
                  flush=True)

    overhead(captions[:6], args.steps[0], max(args.repeats, 4))
    if args.dit_steps:
        dit_under_tp(args.dit_steps)


def overhead(captions: list[str], steps: int, repeats: int) -> None:
    """What a backend costs when it caches nothing (a threshold nothing is under): the three servers
    alive at once and their runs interleaved, so the machine's drift hits all alike."""
    nothing = {"none": ("none", {}), "first_block_cache": ("first_block_cache", {"threshold": 1e-9}),
               "magcache": ("magcache", {"threshold": 1e-9})}
    params = OmniDiffusionSamplingParams(seed=0, num_inference_steps=steps)
    with contextlib.ExitStack() as stack:
        engines = {label: stack.enter_context(Omni(model=MODEL, cache_backend=backend, cache_config=config))
                   for label, (backend, config) in nothing.items()}
        for engine in engines.values():
            engine.generate(captions[0], OmniDiffusionSamplingParams(seed=0, num_inference_steps=2, cache="off"))
        seconds = {label: [] for label in engines}
        for _ in range(repeats):
            for label, engine in engines.items():
                started = time.perf_counter()
                outputs = engine.generate(captions, params)
                seconds[label].append(time.perf_counter() - started)
                assert all(o.timings.get("cached_steps", 0) == 0 for o in outputs)
    print(f"\nOverhead of a backend that caches nothing: {len(captions)} prompts x {steps} steps, the three "
          f"interleaved, {repeats} repeats\n")
    print("| backend | s/step | vs none: median (min-max) |")
    print("|---|---|---|")
    base = statistics.median(seconds["none"])
    for label, times in seconds.items():
        ratios = sorted(time_ / base for time_ in times)
        print(f"| {label} | {statistics.median(times) / (steps * len(captions)):.4f} | "
              f"{statistics.median(ratios):.3f} ({ratios[0]:.3f}-{ratios[-1]:.3f}) |", flush=True)


def dit_under_tp(steps: int) -> None:
    """The fixed-mask saving of the medium Z-Image-shaped DiT at TP=1 and TP=2."""
    mask = CacheSettings(backend="magcache", mag_ratios=(1.0,), retention_ratio=0.2, max_cached_steps=2,
                         steps=steps + 1)
    print(f"\nmedium Z-Image-shaped DiT, 512x512, {steps} timed steps after one warm-up, fp32, CPU, one thread "
          "per rank; a fixed MagCache step mask\n")
    print("| layout | s/step uncached | s/step cached | DiT calls skipped | speed-up |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder)
        write_medium_model("z-image", directory)
        for label, size in (("TP=1", 1), ("TP=2", 2)):
            layout = DiffusionParallelConfig(tensor_parallel_size=size).layout
            plain = measure("z-image", layout, 1, directory, steps).seconds
            run = measure("z-image", layout, 1, directory, steps, mask)
            cached, skipped = run.seconds, run.cached
            print(f"| {label} | {plain:.3f} | {cached:.3f} | {skipped} of {steps + 1} | {plain / cached:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
