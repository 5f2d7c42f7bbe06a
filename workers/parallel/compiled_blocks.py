"""torch.compile of a rank's DiT shard, one repeated block at a time, and what compiling cost.

Regional: each block whose class the model lists in `_repeated_blocks` (diffusers' list; every
family we serve has one) gets its `forward` compiled, not the whole DiT. All blocks of a class run
the same code, so one compiled graph serves them all and compile time does not grow with depth.
The step cache (workers.parallel.step_cache) wraps these forwards, so its decisions stay outside
every graph; the collectives inside a block are traceable (parallel_state.all_reduce,
sequence_parallel's attention op), so a block is one graph at any layout.

Every dimension is symbolic from the first compile (`dynamic=True`), and inputs are made
contiguous, so no image size, prompt length or step recompiles; a graph is compiled per kind of
block (Z-Image's refiners without modulation), for one image and for several (PyTorch specialises
sizes of 1), and with or without an attention mask. The warm-up runs those cases
(engine/startup._WARM_UP_RUNS); what compiles later is counted (`compile_stats`) and logged, with
the request that waited for it. Batches with LoRA adapters or TaylorSeer run the eager forwards
(`eager_for`).

Compiled artefacts go to `cache_dir` (inductor's FX-graph and AOT-autograd caches), so a restart,
of a rank or of the server, reads them back instead of compiling again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from configs import CacheSettings
from workers.messages import CompileStats

_GRAPHS_PER_BLOCK = 64


def eager_for(cache: CacheSettings, adapters: bool) -> bool:
    """Whether a batch runs the eager forwards. With LoRA adapters active: the graphs are traced
    without them (PyTorch does not guard on the layers' adapter hooks), so a compiled batch would
    silently leave them out. With TaylorSeer: diffusers' hooks swap attention forwards and keep
    Python state per call, which would recompile at every change."""
    return adapters or cache.backend == "taylorseer"


def compile_stats() -> CompileStats:
    """This process's compiles so far, from torch._dynamo's counters."""
    from torch._dynamo.utils import compilation_time_metrics, counters
    return CompileStats(graphs=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()),
                        cache_hits=counters["inductor"]["fxgraph_cache_hit"],
                        cache_misses=counters["inductor"]["fxgraph_cache_miss"],
                        seconds=sum(compilation_time_metrics.get("_compile.compile_inner", [])))


def use_cache_dir(path: str) -> None:
    """Where inductor keeps compiled graphs; read when it compiles, so set before the first compile."""
    os.makedirs(path, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path


class CompiledBlocks:
    """The repeated blocks of `dit`, compiled; `eager` switches a batch back to the plain forwards."""

    def __init__(self, dit: nn.Module):
        names = set(getattr(dit, "_repeated_blocks", ()) or ())
        blocks = [module for module in dit.modules() if type(module).__name__ in names]
        if not blocks:
            raise ValueError(f"{type(dit).__name__} lists no repeated blocks (_repeated_blocks) to compile")
        self.eager = False
        # a graph per block kind x (one image, several) x (mask, none): can pass the default 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _GRAPHS_PER_BLOCK)
        # Two dimensions of equal size would share one symbol, and the graph would hold only while
        # they stay equal (a prompt as long as the image's tokens): a recompile, and a cache miss.
        torch.fx.experimental._config.use_duck_shape = False
        for block in blocks:
            block.forward = self._switch(block.forward, torch.compile(block.forward, dynamic=True))

    def _switch(self, eager: Callable[..., Any], compiled: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if self.eager:
                return eager(*args, **kwargs)
            return compiled(*map(_contiguous, args), **{name: _contiguous(value) for name, value in kwargs.items()})
        return forward


def _contiguous(value: Any) -> Any:
    """Graphs are guarded on their inputs' strides; a view (a rotary table cut to the prompt's
    length) would have other strides at every length and compile again."""
    return value.contiguous() if isinstance(value, torch.Tensor) else value
