"""What partial-image previews cost: request time with 0-3 previews, printed as a table.

tiny/z-image's pipeline (scheduler, text encoder, VAE) around a medium Z-Image-shaped DiT
(dim 768, 12 heads, ~86M parameters, random weights), 512x512, 9 steps, one rank, fp32, CPU.
Previews are decoded by the real VAE at half resolution on the driver.

    python benchmarks/streaming.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import diffusers
import torch

from engine import Omni, OmniDiffusionSamplingParams, resolve_model

MEDIUM_DIT = dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=768, n_layers=7, n_refiner_layers=2,
                  n_heads=12, n_kv_heads=12, cap_feat_dim=32, axes_dims=[16, 24, 24], axes_lens=[1024, 512, 512])


def write_pipeline(directory: Path) -> Path:
    folder = directory / "medium-z-image"
    shutil.copytree(resolve_model("tiny/z-image").path, folder)
    shutil.rmtree(folder / "transformer")
    torch.manual_seed(0)
    diffusers.ZImageTransformer2DModel(**MEDIUM_DIT).save_pretrained(folder / "transformer")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    params = OmniDiffusionSamplingParams(num_inference_steps=9, height=512, width=512, seed=1)
    with tempfile.TemporaryDirectory() as folder, Omni(model=str(write_pipeline(Path(folder)))) as omni:
        omni.generate("warm-up", params)
        print(f"{'partial_images':<16}{'s/request':>10}{'overhead':>10}")
        baseline = None
        for count in range(4):
            seconds = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                omni.generate("a cat", dataclasses.replace(params, partial_images=count), on_partial=lambda p: None)
                seconds.append(time.perf_counter() - started)
            median = statistics.median(seconds)
            baseline = baseline or median
            print(f"{count:<16}{median:>10.3f}{(median / baseline - 1) * 100:>9.1f}%", flush=True)


if __name__ == "__main__":
    main()
