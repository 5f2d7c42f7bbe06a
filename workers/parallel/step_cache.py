"""Step caching on a rank's DiT shard: skip the repeated transformer blocks at steps where they would
change little, the same way on every rank of every layout.

Three backends (vLLM-Omni's names):
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
- `magcache`: MagCache's rule (Ma et al. 2025): skip the whole stack, first block included, while
  the error accumulated from the model's calibrated magnitude ratios since the last full call stays
  under `threshold`; the stack's last residual is added instead. The decision reads only the ratios
  and the step, so it agrees on every rank; `calibrate` measures the ratios (a float64 mean over
  tokens, summed over the pieces like the first-block metric). Written here rather than taken from
  diffusers' MagCache hook, which finds a block's hidden states by the name `hidden_states` (Z-Image
  calls them `x`) and keeps no residual for the encoder hidden states.

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

from configs.caching import BLOCK_SKIPPING_BACKENDS, CacheSettings
from workers.parallel import parallel_state

ROWS = "rows"  # the branch of a call whose rows hold both guidance branches (or the only one)
_STACKS = ("transformer_blocks", "single_transformer_blocks", "layers")  # the repeated blocks, in call order
_TAYLORSEER_HOOK = "taylorseer_cache"
# the attention modules TaylorSeer predicts
_ATTENTION = r"(transformer_blocks|single_transformer_blocks|layers)\.\d+\.(attn|attn2|attention)"


@dataclass
class _BranchState:
    calls: int = 0
    cached_in_a_row: int = 0
    skipping: bool = False
    base: tuple[torch.Tensor | None, ...] | None = None  # what the stack's residual is measured from
    tail_residuals: tuple[torch.Tensor | None, ...] | None = None  # the last full call's stack residual
    head_residual: torch.Tensor | None = None  # first_block_cache: the first block's, at that call
    ratio: float = 1.0  # magcache: the product of the ratios since the last full call
    error: float = 0.0  # magcache: the error accumulated since then
    ratios: list[float] = field(default_factory=list)  # magcache calibration: one per call
    calibration_residual: torch.Tensor | None = None


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
    _ratios: list[float] = field(default_factory=list)  # magcache: its ratios stretched to the steps

    def __post_init__(self) -> None:
        self._blocks = [block for name in _STACKS for block in getattr(self.dit, name, None) or []]
        for index, block in enumerate(self._blocks):
            _wrap(block, self, index)

    def begin(self, settings: CacheSettings) -> None:
        """Before each batch, on every rank: its settings, and no state carried over."""
        if self.settings.backend == "taylorseer":
            HookRegistry.check_if_exists_or_initialize(self.dit).remove_hook(_TAYLORSEER_HOOK, recurse=True)
        self.settings, self._states, self.cached_calls = settings, {}, 0
        if settings.backend == "magcache" and settings.mag_ratios:
            self._ratios = _stretched(settings.mag_ratios, settings.steps or len(settings.mag_ratios))
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

    # first_block_cache and magcache --------------------------------------------------------------
    def run_block(self, index: int, forward, metadata, args: tuple, kwargs: dict):
        if self.settings.backend not in BLOCK_SKIPPING_BACKENDS or self._call is None:
            return forward(*args, **kwargs)
        state = self._states.setdefault(self._call.branch, _BranchState())
        inputs = _tensors_in(metadata, args, kwargs)
        if index == 0:
            output = self._run_head(state, metadata, forward, args, kwargs, inputs)
        else:  # while skipping, the blocks between pass their inputs on
            output = _as_output(metadata, inputs) if state.skipping else forward(*args, **kwargs)
        if index < len(self._blocks) - 1:
            return output
        if state.skipping:  # the last block adds the last full call's residual
            return _with_residuals(metadata, output, state.tail_residuals)
        state.tail_residuals = tuple(None if out is None or base is None else out - base
                                     for out, base in zip(_tensors_out(metadata, output), state.base))
        if self.settings.calibrate:
            self._calibrate(state, state.tail_residuals[0])
        return output

    def _run_head(self, state: _BranchState, metadata, forward, args: tuple, kwargs: dict, inputs: tuple):
        """The first block: decide whether this call skips the stack, and remember what the stack's
        residual is measured from (first_block_cache: the first block's output; magcache: its input)."""
        if self.settings.backend == "magcache":
            state.skipping = self._magcache_skips(state)
            output = _as_output(metadata, inputs) if state.skipping else forward(*args, **kwargs)
            base = inputs
        else:
            output = forward(*args, **kwargs)
            base = _tensors_out(metadata, output)
            residual = base[0] - inputs[0]
            state.skipping = self._first_block_unchanged(state, residual)
            if not state.skipping:
                state.head_residual = residual
        state.calls += 1
        if state.skipping:
            state.cached_in_a_row += 1
            self.cached_calls += self._call.branch != "uncond"  # steps: a cond call (or rows) per step
        else:
            state.cached_in_a_row, state.base = 0, base
        return output

    def _first_block_unchanged(self, state: _BranchState, residual: torch.Tensor) -> bool:
        """The same answer on every rank: float64 sums over the pieces, added in member order."""
        if state.head_residual is None or state.calls < self.settings.warmup_steps \
                or state.cached_in_a_row >= self.settings.max_cached_steps or state.tail_residuals is None:
            return False
        change, scale = self._summed_over_pieces([(residual - state.head_residual).abs().sum(dtype=torch.float64),
                                                  state.head_residual.abs().sum(dtype=torch.float64)])
        return scale > 0 and change / scale < self.settings.threshold

    def _magcache_skips(self, state: _BranchState) -> bool:
        """MagCache's rule, from the calibrated ratios alone (so the same on every rank): after the
        retained first steps, skip while the error accumulated since the last full call is small."""
        settings, step = self.settings, state.calls
        if settings.calibrate or step < int(settings.retention_ratio * len(self._ratios) + 0.5):
            return False
        state.ratio *= self._ratios[step] if step < len(self._ratios) else 1.0
        state.error += abs(1.0 - state.ratio)
        if state.tail_residuals is not None and state.error <= settings.threshold \
                and state.cached_in_a_row < settings.max_cached_steps:
            return True
        state.ratio, state.error = 1.0, 0.0
        return False

    def _calibrate(self, state: _BranchState, residual: torch.Tensor) -> None:
        """MagCache's ratio of this call: the mean over tokens of |residual| / |previous residual|."""
        if state.calibration_residual is None:
            state.ratios.append(1.0)
        else:
            norms = torch.linalg.vector_norm(residual.double(), dim=-1)
            previous = torch.linalg.vector_norm(state.calibration_residual.double(), dim=-1)
            total, count = self._summed_over_pieces([(norms / (previous + 1e-8)).sum(),
                                                     torch.tensor(float(norms.numel()), dtype=torch.float64,
                                                                  device=norms.device)])
            state.ratios.append(round(total / count, 5))
        state.calibration_residual = residual

    def calibration(self) -> list[float]:
        """The ratios a calibrating batch measured, of its conditional (or rows) calls."""
        state = self._states.get("cond") or self._states.get(ROWS)
        return state.ratios if state is not None else []

    def _summed_over_pieces(self, values: list[torch.Tensor]) -> list[float]:
        """Float64 sums of this rank's piece, added over the ranks holding the call's other pieces in
        member order: every rank gets the same numbers, the ones TP=1 computes (up to rounding)."""
        sums = torch.stack(values)  # stays on the device: NCCL
        for axis in self._call.axes:
            sums = torch.stack([member[0] for member in parallel_state.all_gather([sums], axis)]).sum(0)
        return sums.tolist()


def _stretched(ratios: tuple[float, ...], length: int) -> list[float]:
    """Calibrated ratios for another step count: the nearest calibrated step of each step."""
    if length == 1:
        return list(ratios[-1:])
    scale = (len(ratios) - 1) / (length - 1)
    return [ratios[round(step * scale)] for step in range(length)]


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
