"""Step caching on a rank's DiT shard: skip the repeated transformer blocks at steps where they would
change little, the same way on every rank of every layout.

Two backends (vLLM-Omni's names):
- `first_block_cache`: each DiT call computes the first block; when its residual moved less than
  `threshold` (relative L1) since the last fully computed call of the same branch, the other blocks
  are skipped and their last residual is added instead. Written here rather than taken from
  diffusers' hook because the decision must be one for the whole layout: the two sums the metric
  is made of are taken in float64 over this rank's piece of the hidden states, then gathered over
  the ranks that hold the other pieces (Ulysses ranks; the CFG groups when they split one call's
  rows) and added in member order, so every rank compares the same number with the threshold, and
  the number is the one TP=1 computes (up to float64 rounding). Skipping only after `warmup_steps`
  computed calls and never more than `max_cached_steps` in a row.
- `taylorseer`: diffusers' TaylorSeer hooks (the attention outputs predicted by a Taylor series
  between full computations every `cache_interval` calls). Its decisions are a schedule of call
  counts, so they agree on every rank by construction.

State is kept per branch ("cond", "uncond", or "rows" when both branches are rows of one call), so
a branch run on another CFG group sees exactly the calls it sees at TP=1. Requests that cache run
alone (engine.scheduler), so a decision never depends on who else was in the batch.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context
from torch import nn

from configs.caching import CacheSettings
from workers.parallel import parallel_state

_STACKS = ("transformer_blocks", "single_transformer_blocks", "layers")  # the repeated blocks, in call order
_TAYLORSEER_HOOK = "taylorseer_cache"
# the attention modules TaylorSeer predicts
_ATTENTION = r"(transformer_blocks|single_transformer_blocks|layers)\.\d+\.(attn|attn2|attention)"


@dataclass
class _BranchState:
    calls: int = 0
    cached_in_a_row: int = 0
    head_residual: torch.Tensor | None = None
    tail_residuals: tuple[torch.Tensor | None, ...] | None = None
    head_output: tuple[torch.Tensor | None, ...] | None = None
    skipping: bool = False


@dataclass
class _Call:
    branch: str
    axes: tuple[str, ...]  # the axes whose ranks hold the other pieces of this call's hidden states


@dataclass
class StepCache:
    """Installed once on a rank's DiT; `begin` sets each batch's settings, `call` wraps each DiT call."""

    dit: nn.Module
    settings: CacheSettings = CacheSettings()
    cached_calls: int = 0  # this batch's steps whose cond (or rows) call was skipped or predicted
    _blocks: list[nn.Module] = field(default_factory=list)
    _states: dict[str, _BranchState] = field(default_factory=dict)
    _call: _Call | None = None

    def __post_init__(self) -> None:
        self._blocks = [block for name in _STACKS for block in getattr(self.dit, name, None) or []]
        for index, block in enumerate(self._blocks):
            _wrap(block, self, index)

    def begin(self, settings: CacheSettings) -> None:
        """Before each batch, on every rank: its settings, and no state carried over."""
        if self.settings.backend == "taylorseer":
            HookRegistry.check_if_exists_or_initialize(self.dit).remove_hook(_TAYLORSEER_HOOK, recurse=True)
        self.settings, self._states, self.cached_calls = settings, {}, 0
        if settings.backend == "taylorseer":
            apply_taylorseer_cache(self.dit, TaylorSeerCacheConfig(
                cache_interval=settings.cache_interval, disable_cache_before_step=settings.disable_cache_before_step,
                taylor_factors_dtype=None, cache_identifiers=[_ATTENTION]))

    @contextlib.contextmanager
    def call(self, branch: str, axes: tuple[str, ...]) -> Iterator[None]:
        """Around one DiT call of `branch`, whose hidden states are split over the ranks of `axes`."""
        self._call = _Call(branch, axes)
        taylorseer = self.settings.backend == "taylorseer"
        if taylorseer:
            state = self._states.setdefault(branch, _BranchState())
            self.cached_calls += branch != "uncond" and not self._taylorseer_computes(state.calls)
            state.calls += 1
            _set_cache_context(self.dit, CacheContext(branch))
        try:
            yield
        finally:
            self._call = None
            if taylorseer:
                _set_cache_context(self.dit, None)

    def _taylorseer_computes(self, call: int) -> bool:
        """diffusers' TaylorSeer schedule: the first calls, then one in every `cache_interval`."""
        before = self.settings.disable_cache_before_step
        return call < before or (call - before - 1) % self.settings.cache_interval == 0

    # first_block_cache -----------------------------------------------------------------------------
    def run_block(self, index: int, forward, metadata, args: tuple, kwargs: dict):
        if self.settings.backend != "first_block_cache" or self._call is None:
            return forward(*args, **kwargs)
        state = self._states.setdefault(self._call.branch, _BranchState())
        inputs = _tensors_in(metadata, args, kwargs)
        if index == 0:
            output = forward(*args, **kwargs)
            outputs = _tensors_out(metadata, output)
            residual = outputs[0] - inputs[0]
            state.skipping = self._should_skip(state, residual)
            state.calls += 1
            if state.skipping:
                state.cached_in_a_row += 1
                self.cached_calls += self._call.branch != "uncond"  # steps: a cond call (or rows) per step
            else:
                state.cached_in_a_row, state.head_residual, state.head_output = 0, residual, outputs
            if state.skipping and len(self._blocks) == 1:
                return _with_residuals(metadata, output, state.tail_residuals)
            return output
        if state.skipping:  # the blocks between pass their inputs on; the last adds the cached residual
            passed = _as_output(metadata, inputs)
            return _with_residuals(metadata, passed, state.tail_residuals) if index == len(self._blocks) - 1 else passed
        output = forward(*args, **kwargs)
        if index == len(self._blocks) - 1:
            state.tail_residuals = tuple(
                None if out is None or head is None else out - head
                for out, head in zip(_tensors_out(metadata, output), state.head_output))
        return output

    def _should_skip(self, state: _BranchState, residual: torch.Tensor) -> bool:
        """The same answer on every rank: float64 sums over the pieces, added in member order."""
        if state.head_residual is None or state.calls < self.settings.warmup_steps \
                or state.cached_in_a_row >= self.settings.max_cached_steps or state.tail_residuals is None:
            return False
        sums = torch.stack([(residual - state.head_residual).abs().sum(dtype=torch.float64),
                            state.head_residual.abs().sum(dtype=torch.float64)])  # on the device: NCCL
        for axis in self._call.axes:
            sums = torch.stack([member[0] for member in parallel_state.all_gather([sums], axis)]).sum(0)
        change, scale = sums.tolist()
        return scale > 0 and change / scale < self.settings.threshold


def _wrap(block: nn.Module, cache: StepCache, index: int) -> None:
    metadata = _Metadata.of(block)
    forward = block.forward

    def cached_forward(*args, **kwargs):
        return cache.run_block(index, forward, metadata, args, kwargs)

    block.forward = cached_forward


@dataclass(frozen=True)
class _Metadata:
    """Where a block's hidden states (and encoder hidden states) are in its arguments and outputs;
    diffusers' registry gives the outputs, the block's signature the arguments (Z-Image's is `x`)."""

    return_hidden_states_index: int
    return_encoder_hidden_states_index: int | None
    parameters: tuple[str, ...]
    hidden_states_argument_name: str
    encoder_hidden_states_argument_name: str

    @classmethod
    def of(cls, block: nn.Module) -> _Metadata:
        registered = TransformerBlockRegistry.get(type(block))
        parameters = tuple(inspect.signature(type(block).forward).parameters)[1:]
        hidden = registered.hidden_states_argument_name
        return cls(registered.return_hidden_states_index, registered.return_encoder_hidden_states_index, parameters,
                   hidden if hidden in parameters else parameters[0], registered.encoder_hidden_states_argument_name)

    def argument(self, name: str, args: tuple, kwargs: dict) -> torch.Tensor | None:
        if name in kwargs:
            return kwargs[name]
        position = self.parameters.index(name)
        return args[position] if position < len(args) else None


def _tensors_in(metadata: _Metadata, args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, ...]:
    hidden = metadata.argument(metadata.hidden_states_argument_name, args, kwargs)
    if metadata.return_encoder_hidden_states_index is None:
        return (hidden,)
    return hidden, metadata.argument(metadata.encoder_hidden_states_argument_name, args, kwargs)


def _tensors_out(metadata, output) -> tuple[torch.Tensor | None, ...]:
    """(hidden states, encoder hidden states) of a block's output, or (hidden states,)."""
    if not isinstance(output, tuple):
        return (output,)
    hidden = output[metadata.return_hidden_states_index]
    if metadata.return_encoder_hidden_states_index is None:
        return (hidden,)
    return hidden, output[metadata.return_encoder_hidden_states_index]


def _as_output(metadata, tensors: tuple[torch.Tensor | None, ...]):
    if metadata.return_encoder_hidden_states_index is None:
        return tensors[0]
    output = [None, None]
    output[metadata.return_hidden_states_index] = tensors[0]
    output[metadata.return_encoder_hidden_states_index] = tensors[1]
    return tuple(output)


def _with_residuals(metadata, output, residuals: tuple[torch.Tensor | None, ...]):
    tensors = _tensors_out(metadata, output)
    return _as_output(metadata, tuple(
        tensor if tensor is None or residual is None else tensor + residual
        for tensor, residual in zip(tensors, residuals)))
