"""How fast each rank loads its shard, printed as a table (GiB/s per rank, and the slowest rank).

Real published shapes, shortened in depth only: SD3.5-large's DiT (4 of 38 blocks) and Qwen-Image's
DiT (3 of 60 blocks), random weights saved in bf16 in the real checkpoint layout (several
safetensors files with an index). Every rank of a TP group loads at the same time, as the
workers do (`workers.parallel.sharded_loading.load_component_shard`: slices read with get_slice, straight
to the rank's device, cast there).

    python benchmarks/load.py [--dtype bfloat16] [--sizes 1 2 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import diffusers
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ is the repository's, not installed

from configs import load_family, load_published_models
from tests.helpers import run_ranks
from workers import RankLayout
from workers.parallel import parallel_state
from workers.parallel.sharded_loading import dit_component, load_component_shard

MODELS = {  # family, hub id, blocks kept (config key)
    "sd3": ("stabilityai/stable-diffusion-3.5-large", {"num_layers": 4}),
    "qwen-image": ("Qwen/Qwen-Image", {"num_layers": 3}),
}


def write_model(family: str, root: Path) -> int:
    hub_id, overrides = MODELS[family]
    _, class_name, config = load_published_models()[hub_id]["transformer"]
    torch.manual_seed(0)
    model = getattr(diffusers, class_name).from_config({**config, **overrides}).to(torch.bfloat16)
    model.save_pretrained(root / family / "transformer", max_shard_size="200MB")
    (root / family / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", class_name]}))
    return sum(p.nbytes for p in model.parameters())


def load_rank(rank: int, world_size: int, port: int, family: str, dtype: str, root: Path, results) -> None:
    torch.set_num_threads(1)
    parallel_state.initialize(rank, RankLayout(tensor_parallel_size=world_size), "cpu", port)
    started = time.perf_counter()
    shard = load_component_shard(dit_component(load_family(family)), root / family / "transformer", rank,
                                 world_size, torch.device("cpu"), getattr(torch, dtype))
    seconds = time.perf_counter() - started
    held = sum(t.nbytes for t in (*shard.parameters(), *shard.buffers()))
    results.put((rank, held, seconds))
    parallel_state.shutdown()


def measure(family: str, world_size: int, dtype: str, root: Path) -> list[tuple[int, int, float]]:
    return run_ranks(load_rank, world_size, family, dtype, root, timeout_s=1800)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        print(f"{'model':<12}{'TP':>4}{'GiB/rank':>10}{'s (slowest)':>13}{'GiB/s/rank':>12}{'GiB/s total':>13}")
        for family in MODELS:
            total = write_model(family, root)
            for size in args.sizes:
                ranks = measure(family, size, args.dtype, root)
                slowest = max(seconds for _, _, seconds in ranks)
                per_rank = max(held for _, held, _ in ranks) / 2**30
                print(f"{family:<12}{size:>4}{per_rank:>10.2f}{slowest:>13.2f}{per_rank / slowest:>12.2f}"
                      f"{sum(h for _, h, _ in ranks) / 2**30 / slowest:>13.2f}", flush=True)
            print(f"{'':<12}(checkpoint {total / 2**30:.2f} GiB in bf16)")


if __name__ == "__main__":
    main()
