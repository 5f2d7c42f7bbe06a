"""How well `builtin/shapes` draws what the prompt says, judged by a program (tools/shapes/judge.py).

Prompts: every colour/shape/position combination held out of training, each on two backgrounds at
both sizes (96 prompts), one seed each, at the model's default steps, through `Omni` at each TP size.
Columns: the share of images whose background colour is right; whose shape colour and position are
both right; whose shape class is right. Targets: >= 95%, >= 85%, >= 70%.

    python benchmarks/shapes_quality.py [--tp 1 2] [--seeds 1] [--steps N] [--save DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ is the repository's, not installed

from engine import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams  # noqa: E402
from tools.shapes.judge import judge, score  # noqa: E402
from tools.shapes.scenes import COLOURS, SIZES, Scene, held_out_triples  # noqa: E402

MODEL = "builtin/shapes"


def held_out_scenes(backgrounds_per_combination: int = 2, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    scenes = []
    for colour, shape, position in sorted(held_out_triples()):
        others = [name for name in COLOURS if name != colour]
        for background in rng.choice(others, backgrounds_per_combination, replace=False):
            scenes += [Scene(shape, colour, str(background), position, size) for size in SIZES]
    return scenes


def evaluate(tp: int, scenes: list[Scene], seeds: int, steps: int | None, save: Path | None) -> dict[str, float]:
    totals = np.zeros(3)
    started = time.perf_counter()
    with Omni(model=MODEL, parallel_config=DiffusionParallelConfig(tensor_parallel_size=tp)) as omni:
        for seed in range(seeds):
            params = OmniDiffusionSamplingParams(seed=seed, num_inference_steps=steps)
            outputs = omni.generate([scene.caption() for scene in scenes], params)
            for index, (scene, output) in enumerate(zip(scenes, outputs)):
                image = output.images[0]
                verdict = score(scene, judge(np.asarray(image.convert("RGB"))))
                totals += (verdict.background, verdict.colour_and_position, verdict.shape)
                if save is not None:
                    save.mkdir(parents=True, exist_ok=True)
                    image.save(save / f"tp{tp}-seed{seed}-{index:03d}.png")
    images = len(scenes) * seeds
    rates = totals / images
    return {"tp": tp, "images": images, "background": rates[0], "colour_position": rates[1], "shape": rates[2],
            "s_per_image": (time.perf_counter() - started) / images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="default: the model's (9)")
    parser.add_argument("--save", type=Path, default=None, help="write every image here")
    args = parser.parse_args()
    scenes = held_out_scenes()
    print(f"{MODEL}: {len(scenes)} held-out prompts x {args.seeds} seed(s), steps={args.steps or 'default'}")
    print(f"{'TP':>3} {'images':>7} {'background':>11} {'colour+pos':>11} {'shape':>7} {'s/image':>8}")
    for tp in args.tp:
        row = evaluate(tp, scenes, args.seeds, args.steps, args.save)
        print(f"{row['tp']:>3} {row['images']:>7} {row['background']:>11.1%} {row['colour_position']:>11.1%} "
              f"{row['shape']:>7.1%} {row['s_per_image']:>8.3f}")


if __name__ == "__main__":
    main()
