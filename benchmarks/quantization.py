"""Quantized weights: what they save, what they cost on a CPU, how far the picture moves.

1. Full-size per-rank memory (meta device, the loaders' own code) of Qwen-Image and FLUX.1-dev at
   TP 1/2/4/8: the DiT shard and rank 0's total, in bf16, fp8, int8, GGUF Q8_0 and Q4_K (for GGUF
   the DiT only, as its file holds; layers whose rows are not whole Q4_K blocks fall back to Q8_0).
2. The per-step cost of dequantizing per call (weight-only, as on any device without FP8 matmuls)
   against bf16 weights: the medium Z-Image-shaped DiT of benchmarks/parallel_modes.py, one
   forward at 512x512 in bf16, TP=1, formats interleaved --repeats times; ratio to bf16 of each
   repeat (median, min-max).
3. The picture: PSNR of each format's image against the float32 one on builtin/shapes (same
   prompts and seeds, TP=1), mean and min over --prompts prompts. Every format keeps the family's
   `keep` layers (input and output) in float, GGUF files too, so the formats compare alike.

    python benchmarks/quantization.py [--repeats 3] [--prompts 4]
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
from gguf import GGMLQuantizationType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.parallel_modes import step_calls, write_medium_model  # noqa: E402
from configs import load_family  # noqa: E402
from engine import Omni, OmniDiffusionSamplingParams, resolve_model  # noqa: E402
from engine.memory_report import memory_report  # noqa: E402
from workers.parallel.sharded_loading import dit_component, load_component_shard  # noqa: E402
from workers.quantization.gguf_files import write_model_gguf  # noqa: E402
from workers.quantization.schemes import Quantization  # noqa: E402

FORMATS = {"bf16": None, "fp8": "fp8", "int8": "int8", "Q8_0": "gguf:Q8_0", "Q4_K": "gguf:Q4_K"}
GiB = 2**30


def memory_table() -> None:
    print("full-size per-rank memory, GiB: DiT shard / rank 0 total (bf16 compute dtype; meta device)")
    for hub_id in ("Qwen/Qwen-Image", "black-forest-labs/FLUX.1-dev"):
        model = resolve_model(hub_id, configs_only=True)
        print(f"\n{hub_id}\n| TP | " + " | ".join(FORMATS) + " |\n|---|" + "---|" * len(FORMATS))
        for tp in (1, 2, 4, 8):
            cells = []
            for quantization in FORMATS.values():
                rank = memory_report(model, tp, torch.bfloat16, ranks=[0], quantization=quantization)[0]
                cells.append(f"{rank.dit / GiB:.2f} / {rank.total / GiB:.2f}")
            print(f"| {tp} | " + " | ".join(cells) + " |")


def _medium_dits(directory: Path) -> dict[str, torch.nn.Module]:
    write_medium_model("z-image", directory)
    folder = directory / "z-image" / "transformer"
    plain = diffusers.ZImageTransformer2DModel.from_pretrained(folder)
    family = load_family("z-image")
    dits = {}
    for name, quantization in FORMATS.items():
        if name in ("Q8_0", "Q4_K"):
            target = directory / name / "transformer"
            shutil.copytree(folder, target)
            write_model_gguf(plain, target / "model.gguf", GGMLQuantizationType[name])
            quantization, folder_used = "gguf", target
        else:
            folder_used = folder
        asked = Quantization.parse(quantization, family.quantization)
        dits[name] = load_component_shard(dit_component(family), folder_used, 0, 1, torch.device("cpu"),
                                          torch.bfloat16, quantization=asked)
    return dits


def step_cost_table(repeats: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        dits = _medium_dits(Path(folder))
        (args, kwargs), = step_calls("z-image")
        args = [[t.to(torch.bfloat16) for t in args[0]], args[1], [t.to(torch.bfloat16) for t in args[2]]]
        times = {name: [] for name in dits}
        with torch.inference_mode():
            for name, dit in dits.items():  # warm-up
                dit(*args, **kwargs)
            for _ in range(repeats):
                for name, dit in dits.items():
                    started = time.perf_counter()
                    dit(*args, **kwargs)
                    times[name].append(time.perf_counter() - started)
        weights = {name: sum(t.nbytes for t in (*d.parameters(), *d.buffers())) for name, d in dits.items()}
    print(f"\nmedium Z-Image-shaped DiT, 512x512, one forward in bf16 on {torch.get_num_threads()} CPU threads, "
          f"{repeats} interleaved repeats")
    print("| weights | DiT bytes | x of bf16 step time (median, min-max) |\n|---|---|---|")
    for name in dits:
        ratios = [t / b for t, b in zip(times[name], times["bf16"])]
        print(f"| {name} | {weights[name] / 2**20:.0f} MiB | {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f}) |")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def psnr_table(prompts: int) -> None:
    model = resolve_model("builtin/shapes")
    words = ["a large red circle in the centre on a white background", "a small blue square at the top left on a "
             "yellow background", "a large green triangle at the bottom on a black background",
             "a small purple circle on the right on an orange background"][:prompts]
    params = OmniDiffusionSamplingParams(seed=5)
    keep = model.family.quantization.keep
    images = {}
    with tempfile.TemporaryDirectory() as folder:
        gguf_model = shutil.copytree(model.path, Path(folder) / "shapes")
        plain = diffusers.ZImageTransformer2DModel.from_pretrained(gguf_model / "transformer")
        for name, quantization in FORMATS.items():
            path = model.path
            if name in ("Q8_0", "Q4_K"):
                for old in (gguf_model / "transformer").glob("*.gguf"):
                    old.unlink()
                write_model_gguf(plain, gguf_model / "transformer" / "model.gguf", GGMLQuantizationType[name],
                                 keep=lambda layer: any(fnmatch.fnmatchcase(layer, p) for p in keep))
                path, quantization = gguf_model, "gguf"
            dtype = "float32" if name == "bf16" else "auto"
            with Omni(model=str(path), quantization=quantization, dtype=dtype) as omni:
                images[name] = [np.asarray(omni.generate(p, params)[0].images[0]) for p in words]
    print(f"\nbuiltin/shapes, 128x128, 9 steps, fp32 compute: PSNR against unquantized float32 weights "
          f"({len(words)} prompts)")
    print("| weights | PSNR dB, mean | min | max pixel difference |\n|---|---|---|---|")
    for name in FORMATS:
        if name != "bf16":
            scores = [_psnr(a, b) for a, b in zip(images[name], images["bf16"])]
            worst = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(images[name], images["bf16"]))
            print(f"| {name} | {statistics.mean(scores):.1f} | {min(scores):.1f} | {worst} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4)
    args = parser.parse_args()
    memory_table()
    step_cost_table(args.repeats)
    psnr_table(args.prompts)


if __name__ == "__main__":
    main()
