"""Every DiT call, spread over the CFG groups (and, inside each, the Ulysses and TP ranks).

With cfg_parallel_size=2 the two guidance branches of a step run at the same time on two groups
of ranks and meet once per step. The driver's pipeline stays diffusers' own: its DiT's forward is
replaced by a `CfgDispatcher` that turns the pipeline's calls into per-group calls.

- Families whose pipeline calls the DiT twice per step (Qwen-Image, FLUX true CFG) get, for the
  first (cond) call, a promise: a tensor of the output's shape that the pipeline only reads after
  its second (uncond) call. At that second call both branches run, one per group, and the promise
  is filled in place. The pipelines slice or keep the cond output but combine it only after the
  uncond call, so the promise is read after it is filled; a step that ends with a promise still
  open raises instead of giving a wrong image.
- Families that batch the branches as rows of one call (SD3, Z-Image) get the rows split between
  the groups, as do the images of a batch; outputs are concatenated back in row order.
- A call with nothing to split (no true CFG, one image) runs on group 0 while group 1 waits.

Rewriting the denoising loops would have meant five copies of diffusers' schedulers, guidance
rescaling and edit conditioning to keep in step with upstream; catching the calls keeps them.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from configs import CacheSettings
from configs.families import CfgParallelPlan, SequenceParallelPlan
from workers import testing_hooks
from workers.parallel import forward_broadcast, parallel_state, sequence_parallel
from workers.parallel.compiled_blocks import CompiledBlocks, eager_for
from workers.parallel.step_cache import ROWS, StepCache
from workers.parallel.step_merger import StepMerger

logger = logging.getLogger(__name__)


Call = tuple[tuple, dict]


class DitExecutor:
    """This rank's part of one DiT call: its CFG group's call, over the tokens of its Ulysses slice."""

    def __init__(self, dit: nn.Module, plan: SequenceParallelPlan, compiled: bool = False):
        self.forward = dit.forward  # bound before the driver replaces it
        self.signature = inspect.signature(self.forward)
        if parallel_state.size_of(sequence_parallel.AXIS) > 1:
            self._run = sequence_parallel.install(dit, plan)
        else:
            self._run = lambda forward, args, kwargs: forward(*args, **kwargs)
        # in this order: the Ulysses hooks read the blocks' own signatures, and the step cache's
        # decisions wrap the compiled forwards, outside every graph
        self.compiled = CompiledBlocks(dit) if compiled else None
        self.step_cache = StepCache(dit)

    def begin(self, cache: CacheSettings, adapters: bool = False) -> None:
        """Before each batch, on every rank: its step-cache settings, and whether LoRA adapters are
        active in it; either may send its blocks to the eager forwards (compiled_blocks.eager_for)."""
        self.step_cache.begin(cache)
        if self.compiled is not None:
            self.compiled.eager = eager_for(cache, adapters)

    def __call__(self, calls: list[Call | None], exchange: bool, branches: list[str] | None = None) -> list[Any]:
        """Outputs of every group's call when `exchange`, else of this group's only. branches[g]: which
        guidance branch group g's call is ("cond", "uncond", or "rows": both as rows of one call)."""
        testing_hooks.raise_if_asked(parallel_state.rank())
        group = parallel_state.rank_in("cfg")
        call = calls[group] if group < len(calls) else None
        output = None
        if call is not None:
            branch = branches[group] if branches else ROWS
            split = ("ulysses", "cfg") if exchange and branch == ROWS else ("ulysses",)  # who holds other pieces
            with self.step_cache.call(branch, split):
                output = self._run(self.forward, *call)
        if not exchange:
            return [output]
        tensors = _output_tensors(output)
        return [_with_tensors(output, member) for member in parallel_state.all_gather(tensors, "cfg")]


def _output_tensors(output: Any) -> list[torch.Tensor]:
    if not isinstance(output, tuple):
        raise TypeError(f"CFG parallelism needs the DiT called with return_dict=False, got {type(output).__name__}")
    first = output[0]
    return list(first) if isinstance(first, list) else [first]


def _with_tensors(output: tuple, tensors: list[torch.Tensor]) -> tuple:
    return (list(tensors) if isinstance(output[0], list) else tensors[0], *output[1:])


class _CallState(threading.local):
    """What the dispatcher knows about the pipeline call of the calling thread (with continuous
    batching, several pipeline calls run at once, one per thread)."""

    pairs = False
    calls = 0  # in this pipeline call: with pairs, even calls are cond, odd ones uncond
    pending: tuple[Call, torch.Tensor] | None = None


class CfgDispatcher:
    """The driver's DiT forward: decides how each call the pipeline makes is spread over the groups.
    With a `merger` (continuous batching), the per-group calls of concurrent pipeline calls meet
    there and compatible ones run as one forward."""

    def __init__(self, name: str, executor: DitExecutor, plan: CfgParallelPlan):
        self.name, self.executor, self.plan = name, executor, plan
        self._state = _CallState()
        self._told_single = False
        self.merger: StepMerger | None = None

    def begin(self, pairs: bool, cache: CacheSettings = CacheSettings(), adapters: bool = False) -> None:
        """Before each pipeline call: does it call the DiT twice per step (cond, uncond)? And, on
        every rank, its step-cache settings and whether LoRA adapters are active."""
        self._state.pending = None
        self._state.pairs, self._state.calls = pairs, 0
        forward_broadcast.everywhere(forward_broadcast.CACHE, (cache, adapters),
                                     lambda: self.executor.begin(cache, adapters))

    def check_settled(self) -> None:
        """After each step: a cond call whose uncond never came would leave a promise unread-but-used."""
        if self._state.pending is not None:
            self._state.pending = None
            raise RuntimeError("CFG parallel: the pipeline made a cond DiT call without its uncond call this step")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._state.calls += 1
        if parallel_state.size_of("cfg") == 1:
            return self._run([(args, kwargs)], exchange=False, branches=[self._branch()])[0]
        if self._state.pairs:
            return self._pair(args, kwargs)
        if self.plan.branches == "batched":
            return self._rows(args, kwargs)
        return self._on_group_zero(args, kwargs)

    def _on_group_zero(self, args: tuple, kwargs: dict) -> Any:
        if not self._told_single:
            self._told_single = True
            logger.info("a DiT call with one guidance branch (no true CFG, guidance off, one image) runs on CFG "
                        "group 0 while group 1 waits (logged once)")
        return self._run([(args, kwargs)], exchange=False, branches=[self._branch()])[0]

    def _branch(self) -> str:
        """The branch of a call that runs on group 0 alone: with pairs, cond and uncond alternate."""
        if not self._state.pairs:
            return ROWS
        return "cond" if self._state.calls % 2 == 1 else "uncond"

    def _pair(self, args: tuple, kwargs: dict) -> Any:
        if self._state.pending is None:
            hidden_states = self.executor.signature.bind(*args, **kwargs).arguments["hidden_states"]
            promise = torch.empty_like(hidden_states)
            self._state.pending = ((args, kwargs), promise)
            return (promise,)
        cond_call, promise = self._state.pending
        self._state.pending = None
        cond, uncond = self._run([cond_call, (args, kwargs)], exchange=True, branches=["cond", "uncond"])
        if cond[0].shape != promise.shape or cond[0].dtype != promise.dtype:
            raise RuntimeError(f"CFG parallel: the DiT output {tuple(cond[0].shape)} {cond[0].dtype} does not have "
                               f"the shape of its hidden_states {tuple(promise.shape)} {promise.dtype}")
        promise.copy_(cond[0])
        return uncond

    def _rows(self, args: tuple, kwargs: dict) -> Any:
        bound = self.executor.signature.bind(*args, **kwargs)
        batched = [name for name in self.plan.batch_arguments if bound.arguments.get(name) is not None]
        rows = len(bound.arguments[batched[0]])
        if rows < 2:
            return self._on_group_zero(args, kwargs)
        counts = sequence_parallel.shares(rows, 2)
        calls = []
        for start, count in ((0, counts[0]), (counts[0], counts[1])):
            part = bound.signature.bind(*bound.args, **bound.kwargs)
            for name in batched:
                part.arguments[name] = part.arguments[name][start : start + count]
            calls.append((part.args, part.kwargs))
        first, second = self._run(calls, exchange=True, branches=[ROWS, ROWS])
        merged = first[0] + second[0] if isinstance(first[0], list) else torch.cat([first[0], second[0]])
        return (merged, *first[1:])

    def _run(self, calls: list[Call], exchange: bool, branches: list[str]) -> list[Any]:
        if self.merger is not None:
            return self.merger.run(calls, exchange, branches)
        return self.run_on_ranks(calls, exchange, branches)

    def run_on_ranks(self, calls: list[Call], exchange: bool, branches: list[str]) -> list[Any]:
        """One forward on every rank: the followers get the calls, then this rank runs its part."""
        testing_hooks.hold_if_asked()
        return forward_broadcast.everywhere(forward_broadcast.FORWARD, (self.name, calls, exchange, branches),
                                            lambda: self.executor(calls, exchange, branches))


def install_dispatcher(name: str, dit: nn.Module, executor: DitExecutor, plan: CfgParallelPlan) -> CfgDispatcher:
    """Route the driver pipeline's calls of `dit` through a dispatcher (hooks of `dit` still run)."""
    dispatcher = CfgDispatcher(name, executor, plan)
    dit.forward = dispatcher
    return dispatcher


def follower_handlers(dit_name: str, executor: DitExecutor,
                      text_encoders: dict[str, nn.Module]) -> dict[str, Callable[[list[Call], bool], Any]]:
    """What a follower runs for each broadcast forward: its DiT part; a text encoder only in the
    driver's TP group (cfg group 0, Ulysses rank 0), the only ranks that hold one."""
    handlers: dict[str, Callable[..., Any]] = {dit_name: executor,
                                               forward_broadcast.CACHE: lambda settings: executor.begin(*settings)}
    for name, module in text_encoders.items():
        handlers[name] = lambda calls, exchange, module=module: module(*calls[0][0], **calls[0][1])
    return handlers
