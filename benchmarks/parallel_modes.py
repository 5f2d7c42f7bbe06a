"""Seconds per denoising step under each parallel layout on CPU, printed as two tables.

Medium DiTs with random weights are written to a temporary diffusers folder; each layout starts
its ranks the way workers do (sharded safetensors reads, the driver's CFG dispatcher, followers on
their doorbells, Ulysses hooks, shared-memory collectives) and times the DiT calls of one step:

- a Qwen-Image-shaped DiT (dim 768, 12 heads, 8 blocks) with true CFG: a cond call (64 text
  tokens) then an uncond call (16 tokens), as QwenImagePipeline makes them, at 512x512;
- a Z-Image-shaped DiT (dim 768, 12 heads) with one call per step (guidance 0), at 512x512.

Collectives are counted on rank 0: calls per step and MiB it sent (all-reduce: TP; all-to-all and
all-gather: Ulysses; cfg all-gather: the branches meeting; broadcast: the driver's inputs).

    python benchmarks/parallel_modes.py [--steps 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ is the repository's, not installed

from configs import CacheSettings, load_family
from tests.helpers import rank_context, run_ranks
from workers import CompileStats, RankLayout
from workers.parallel import forward_broadcast, parallel_state
from workers.parallel.cfg_parallel import DitExecutor, follower_handlers, install_dispatcher
from workers.parallel.compiled_blocks import compile_stats, use_cache_dir
from workers.parallel.sharded_loading import dit_component, load_component_shard

IMAGE_SIDE = 512
MEDIUM = {
    "qwen-image": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=8, attention_head_dim=64,
                       num_attention_heads=12, joint_attention_dim=768, axes_dims_rope=[8, 28, 28]),
    "z-image": dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=768, n_layers=7,
                    n_refiner_layers=2, n_heads=12, n_kv_heads=12, cap_feat_dim=768, axes_dims=[16, 24, 24],
                    axes_lens=[1024, 512, 512]),
}
LAYOUTS = {
    "qwen-image": [("TP=1, 1 thread", RankLayout(), 1), ("TP=1, 2 threads", RankLayout(), 2),
                   ("TP=2", RankLayout(tensor_parallel_size=2), 1), ("CFG=2", RankLayout(cfg_parallel_size=2), 1),
                   ("Ulysses=2", RankLayout(ulysses_degree=2), 1)],
    "z-image": [("TP=1, 1 thread", RankLayout(), 1), ("TP=1, 2 threads", RankLayout(), 2),
                ("TP=2", RankLayout(tensor_parallel_size=2), 1), ("Ulysses=2", RankLayout(ulysses_degree=2), 1)],
}


def write_medium_model(family: str, directory: Path) -> int:
    torch.manual_seed(0)
    model = getattr(diffusers, load_family(family).transformer_class)(**MEDIUM[family])
    for name in ("x_pad_token", "cap_pad_token"):
        if hasattr(model, name):
            torch.nn.init.normal_(getattr(model, name), std=0.02)
    model.save_pretrained(directory / family / "transformer")
    return sum(p.numel() for p in model.parameters())


def step_calls(family: str) -> list[tuple[tuple, dict]]:
    """The DiT calls of one denoising step, with the pipeline's argument names."""
    generator = torch.Generator().manual_seed(1)
    side = IMAGE_SIDE // 16  # VAE /8, then patches of 2
    if family == "z-image":
        latents = [torch.randn(16, 1, IMAGE_SIDE // 8, IMAGE_SIDE // 8, generator=generator)]
        captions = [torch.randn(64, MEDIUM[family]["cap_feat_dim"], generator=generator)]
        return [((latents, torch.tensor([0.5]), captions), {"return_dict": False})]
    latents = torch.randn(1, side * side, 64, generator=generator)
    calls = []
    for text_tokens in (64, 16):  # cond, then uncond (a short negative prompt)
        calls.append(((), dict(
            hidden_states=latents, timestep=torch.tensor([0.5]), guidance=None,
            encoder_hidden_states=torch.randn(1, text_tokens, 768, generator=generator),
            encoder_hidden_states_mask=torch.ones(1, text_tokens, dtype=torch.long),
            img_shapes=[[(1, side, side)]], return_dict=False)))
    return calls


def run_rank(rank: int, world_size: int, port: int, family: str, layout: RankLayout, threads: int, directory: Path,
             steps: int, doorbells, cache: CacheSettings, compile_cache_dir: str | None, results) -> None:
    torch.set_num_threads(threads)
    parallel_state.initialize(rank, layout, "cpu", port)
    config = load_family(family)
    dit = load_component_shard(dit_component(config), directory / family / "transformer",
                               parallel_state.rank_in("tp"), parallel_state.size_of("tp"), torch.device("cpu"),
                               torch.float32)
    if compile_cache_dir:
        use_cache_dir(compile_cache_dir)
    executor = DitExecutor(dit, config.sequence_parallel, compiled=compile_cache_dir is not None)
    if rank:
        forward_broadcast.follow(follower_handlers("transformer", executor, {}), doorbells[rank - 1], lambda: True)
        parallel_state.shutdown()
        return
    dispatcher = install_dispatcher("transformer", dit, executor, config.cfg_parallel)
    calls = step_calls(family)
    forward_broadcast.ring(doorbells)  # the followers listen from here on: begin sends them the cache settings
    dispatcher.begin(pairs=len(calls) == 2, cache=cache)
    with torch.inference_mode():
        for step in range(steps + 1):
            if step == 1:  # the first step warms up
                parallel_state.reset_collective_counters()
                started = time.perf_counter()
            outputs = [dit(*args, **kwargs) for args, kwargs in calls]
            dispatcher.check_settled()
    elapsed = (time.perf_counter() - started) / steps
    counters = {name: (calls / steps, sent / steps) for name, (calls, sent) in
                parallel_state.collective_counters().items()}
    assert outputs
    if layout.world_size > 1:
        forward_broadcast.send(forward_broadcast.STOP)
    results.put((rank, Measured(elapsed, counters, executor.step_cache.cached_calls, _first_tensor(outputs),
                                compile_stats())))
    parallel_state.shutdown()


def _first_tensor(outputs: list) -> np.ndarray:
    first = outputs[-1][0]
    return (first[0] if isinstance(first, list) else first).numpy().copy()  # a tensor would need its sender alive


@dataclass
class Measured:
    """Rank 0's view of one run; the first step warms up (and compiles) and is not timed."""

    seconds: float  # per step
    counters: dict  # collective -> (calls, bytes sent) per step
    cached: int  # DiT calls the step cache skipped
    output: np.ndarray  # the last DiT call's
    compile: CompileStats


def measure(family: str, layout: RankLayout, threads: int, directory: Path, steps: int,
            cache: CacheSettings = CacheSettings(), compile_cache_dir: str | None = None) -> Measured:
    """`compile_cache_dir`: compile the DiT's blocks, keeping the graphs there (None: eager)."""
    doorbells = [rank_context().Queue() for _ in range(layout.world_size - 1)]
    [(_, measured)] = run_ranks(run_rank, layout.world_size, family, layout, threads, directory, steps, doorbells,
                                cache, compile_cache_dir, timeout_s=1800, reports=1)
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder)
        for family, layouts in LAYOUTS.items():
            parameters = write_medium_model(family, directory)
            branches = "true CFG: 2 DiT calls/step" if family == "qwen-image" else "1 DiT call/step"
            print(f"\n{family}-shaped DiT, {parameters / 1e6:.0f}M parameters, {IMAGE_SIDE}x{IMAGE_SIDE}, "
                  f"{branches}, fp32, CPU, one thread per rank")
            print(f"{'layout':<18}{'s/step':>8}{'speed-up':>10}  collectives per step (calls, MiB sent by rank 0)")
            baseline = None
            for label, layout, threads in layouts:
                measured = measure(family, layout, threads, directory, args.steps)
                seconds, counters = measured.seconds, measured.counters
                baseline = baseline or seconds
                traffic = ", ".join(f"{name} {calls:.0f} ({sent / 2**20:.1f})"
                                    for name, (calls, sent) in sorted(counters.items())) or "-"
                print(f"{label:<18}{seconds:>8.3f}{baseline / seconds:>9.2f}x  {traffic}", flush=True)


if __name__ == "__main__":
    main()
