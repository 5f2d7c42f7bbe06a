"""Per-rank parameter memory of every published model at TP=1/2/4/8, before and after sharding the
modulation layers, embedders, position tables and text encoders; and what that adds per step.

Computed on the meta device from the configurations the project carries (no weights needed), with
the same code the ranks load with. "before" is the plan of the first release: attention and MLP
sharded, everything else of the DiT replicated, the text encoders whole on rank 0.

    python benchmarks/memory.py [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch

import torch

from engine import resolve_model
from engine.memory_report import format_size, memory_report
from engine.models.published_models import published_model_ids
from workers.parallel.sharded_loading import build_meta_component, dit_component

TEXT_TOKENS, IMAGE_TOKENS = 512, 4096  # per image at 1024x1024: what a gathered embedder / table moves


def baseline_components(model):
    """The first release's plan: no gathered columns, no split tables, text encoders whole."""
    dit = dit_component(model.family)
    plan = dit.plan.model_copy(update={
        "layers": [rule for rule in dit.plan.layers if rule.style != "colwise_gather"], "buffers": []})
    return [dataclasses.replace(dit, plan=plan)]


def gathers_per_step(model, dtype: torch.dtype) -> tuple[int, int]:
    """(collectives, bytes) the gathered layers and tables add to one DiT forward of one image."""
    dit = dit_component(model.family)
    module = build_meta_component(dit.library, dit.class_name, model.path / "transformer")
    element = torch.empty((), dtype=dtype).element_size()
    calls = size = 0
    for name, layer in module.named_modules():
        if not isinstance(layer, torch.nn.Linear):
            continue
        rule = next((r for r in dit.plan.layers if fnmatch.fnmatchcase(name, r.pattern)), None)
        if rule is not None and rule.style == "colwise_gather":
            tokens = TEXT_TOKENS if any(word in name for word in ("embedder", "txt_in")) else 1
            calls, size = calls + 1, size + layer.out_features * tokens * element
    for rule in dit.plan.buffers:
        table = module.get_buffer(rule.pattern)
        calls, size = calls + 1, size + table.shape[-1] * IMAGE_TOKENS * element
    return calls, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"{args.dtype} parameters; rank 0 holds the VAE; 'largest' is the largest rank's total\n")
    print("| model | TP | DiT/rank before | DiT/rank after | largest before | largest after | others after |")
    print("|---|---|---|---|---|---|---|")
    for hub_id in published_model_ids():
        model = resolve_model(hub_id, configs_only=True)
        for world_size in (1, 2, 4, 8):
            before = memory_report(model, world_size, dtype, components=baseline_components(model))
            after = memory_report(model, world_size, dtype)
            cells = [max(r.dit for r in before), max(r.dit for r in after), max(r.total for r in before),
                     max(r.total for r in after), max(r.total for r in after[1:]) if world_size > 1 else 0]
            print(f"| {hub_id} | {world_size} | " + " | ".join(map(format_size, cells)) + " |", flush=True)
    print("\nAdded per DiT forward (one image, 1024x1024, text embedders at 512 tokens), at TP > 1:\n")
    print("| model | collectives | bytes |")
    print("|---|---|---|")
    for hub_id in published_model_ids():
        calls, size = gathers_per_step(resolve_model(hub_id, configs_only=True), dtype)
        print(f"| {hub_id} | {calls} | {format_size(size)} |")


if __name__ == "__main__":
    main()
