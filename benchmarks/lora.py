"""What a LoRA adapter costs: per-step time with one resident rank-16 adapter, and switching between adapters.

tiny/z-image's pipeline around the medium Z-Image-shaped DiT of benchmarks/streaming.py (dim 768,
~86M parameters, random weights), 256x256, 6 steps, fp32, CPU, at TP=1 and TP=2. The adapter
touches every Linear of the DiT's blocks. "switch" is the extra time of a request whose adapter
differs from the previous request's (requests alternate between two adapters, both resident),
against requests that keep one adapter; "reload" is the same when max_loras=1 forces every switch
to read the adapter from its file again.

    python benchmarks/lora.py [--repeats 3] [--rank 16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from streaming import write_pipeline

from engine import DiffusionParallelConfig, LoraAdapter, Omni, OmniDiffusionSamplingParams
from engine.models.tiny_adapters import build_random_adapter


def _params(*names: str) -> OmniDiffusionSamplingParams:
    return OmniDiffusionSamplingParams(num_inference_steps=6, height=256, width=256, seed=1,
                                       loras=[LoraAdapter(name) for name in names] or None)


def _request_s(omni: Omni, params: OmniDiffusionSamplingParams) -> tuple[float, float]:
    started = time.perf_counter()
    output = omni.generate("a cat", params)[0]
    return time.perf_counter() - started, output.timings["step_s"]


def measure(model: str, adapters: dict[str, str], tp: int, max_loras: int, repeats: int) -> dict[str, float]:
    with Omni(model=model, parallel_config=DiffusionParallelConfig(tp), lora_modules=adapters,
              max_loras=max_loras) as omni:
        _request_s(omni, _params("x"))
        base = [_request_s(omni, _params()) for _ in range(repeats)]
        same = [_request_s(omni, _params("x")) for _ in range(repeats)]
        switching = [_request_s(omni, _params(name)) for _ in range(repeats) for name in ("y", "x")]
    median = lambda values, i: statistics.median(v[i] for v in values)  # noqa: E731
    return {"base_step": median(base, 1), "lora_step": median(same, 1),
            "switch": median(switching, 0) - median(same, 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model = str(write_pipeline(Path(folder)))
        adapters = {name: str(build_random_adapter(model, Path(folder) / name, rank=args.rank, seed=seed))
                    for seed, name in enumerate(("x", "y"))}
        print(f"{'tp':<4}{'max_loras':>10}{'base s/step':>13}{'lora s/step':>13}{'overhead':>10}"
              f"{'switch s':>10}{'switch/step':>13}")
        for tp, max_loras in ((1, 2), (2, 2), (2, 1)):
            r = measure(model, adapters, tp, max_loras, args.repeats)
            print(f"{tp:<4}{max_loras:>10}{r['base_step']:>13.3f}{r['lora_step']:>13.3f}"
                  f"{(r['lora_step'] / r['base_step'] - 1) * 100:>9.1f}%{r['switch']:>10.3f}"
                  f"{r['switch'] / r['lora_step']:>13.2f}", flush=True)


if __name__ == "__main__":
    main()
