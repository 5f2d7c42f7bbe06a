"""Step-level continuous batching on the driver: the DiT calls of every pipeline call in flight meet
here, and calls of the same shape run as one forward.

Each request runs its own diffusers pipeline call in its own thread (its own scheduler, timesteps,
guidance, seed and step count), so the pipelines stay diffusers' own. Their DiT calls arrive at the
CFG dispatcher's per-group calls (`CfgDispatcher._run`), after the CFG split, so one merge serves
every layout. Rounds: once every thread that is denoising has queued its next call, the queued
calls run, oldest first, in groups of equal key (same argument shapes, same non-batched values,
same CFG branches) of at most `max_images` rows, each group as one forward; a thread that arrives
meanwhile waits for the next round. So a request joins at the next step, a short request never
waits for a long one to finish, and a finished one leaves while the others go on.

Calls of different shapes (another latent size, another prompt length) are not padded into one
forward but take turns in the same round: padding would need each family's attention mask, and
grouping keeps every image exactly the image it is alone (rows never see each other in a DiT).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

Call = tuple[tuple, dict]
_SMALL = 1 << 16  # non-batched tensors up to this many elements are compared by value (position ids)


class SharedForwardFailed(RuntimeError):
    """A merged forward raised: the calls in it cannot tell whose rows caused it (each runs again
    alone, where the one at fault fails by itself)."""


@dataclass(eq=False)
class _Queued:
    calls: list[Call]
    exchange: bool
    branches: list[str]
    key: Hashable
    rows: tuple[int, ...]  # per CFG group's call
    done: bool = False
    output: list[Any] | None = None
    error: BaseException | None = None
    leads: bool = False
    members: list[_Queued] = field(default_factory=list)


class StepMerger:
    """The driver's meeting point of concurrent pipeline calls' DiT calls."""

    def __init__(self, run: Callable[[list[Call], bool, list[str]], list[Any]], signature: inspect.Signature,
                 per_sample: list[str], max_images: int):
        self._run, self._signature, self._per_sample, self._max_images = run, signature, set(per_sample), max_images
        self._lock = threading.Condition()
        self._denoising: set[int] = set()  # threads inside their denoising loop
        self._queued: list[_Queued] = []
        self._round: list[_Queued] = []  # the calls of the round being run, not yet run
        self._busy = False
        self.forward_rows: list[int] = []  # rows of each forward run (the driver reports and clears them)
        self.merged_forwards = 0  # forwards that ran the calls of more than one pipeline call

    def drain(self) -> tuple[list[int], int]:
        """The rows of each forward run since the last drain, and how many of them were merged."""
        with self._lock:
            rows, merged, self.forward_rows, self.merged_forwards = self.forward_rows, self.merged_forwards, [], 0
        return rows, merged

    def leave(self) -> None:
        """The calling thread made its last DiT call (or stopped): rounds no longer wait for it."""
        with self._lock:
            self._denoising.discard(threading.get_ident())
            self._lock.notify_all()

    def run(self, calls: list[Call], exchange: bool, branches: list[str]) -> list[Any]:
        """This thread's DiT call (one (args, kwargs) per CFG group), run with its round's compatible calls."""
        item = _Queued(calls, exchange, branches, *self._describe(calls, exchange, branches))
        with self._lock:
            self._denoising.add(threading.get_ident())
            self._queued.append(item)
            self._lock.notify_all()
            while not item.done and not item.leads:
                if not self._busy and self._next_group(item):
                    break
                self._lock.wait()
        if item.leads:
            self._run_group(item)
        if item.error is not None:
            raise item.error
        return item.output

    def _next_group(self, me: _Queued) -> bool:
        """Under the lock: start the next group if it is time; True when `me` leads it."""
        if not self._round:
            if len(self._queued) < len(self._denoising):  # a denoising thread has not queued yet
                return False
            self._round, self._queued = self._queued, []
        head, rest = self._round[0], self._round[1:]
        group, rows = [head], max(head.rows)
        for item in rest:
            if item.key == head.key and rows + max(item.rows) <= self._max_images:
                group.append(item)
                rows += max(item.rows)
        self._round = [item for item in self._round if item not in group]
        self._busy = True
        head.leads, head.members = True, group
        self._lock.notify_all()
        return head is me

    def _run_group(self, head: _Queued) -> None:
        group = head.members
        try:
            outputs = self._run(*self._merged(group), head.exchange, head.branches)
            offsets = [0] * len(outputs)  # outputs: one per CFG group's call (exchange), else this group's
            for item in group:
                rows = item.rows if len(item.rows) == len(outputs) else item.rows[:1]
                item.output = [_rows_of(output, start, count) for output, start, count in zip(outputs, offsets, rows)]
                offsets = [start + count for start, count in zip(offsets, rows)]
            with self._lock:
                self.forward_rows.append(sum(offsets))
                self.merged_forwards += len(group) > 1
        except BaseException as exc:  # noqa: BLE001 - every call of the forward fails with it
            shared = SharedForwardFailed(f"{type(exc).__name__}: {exc}") if len(group) > 1 else exc
            for item in group:
                item.error = shared
        with self._lock:
            for item in group:
                item.done, item.leads = True, False
            self._busy = False
            self._lock.notify_all()

    def _merged(self, group: list[_Queued]) -> tuple[list[Call]]:
        """One call per CFG group: the batched arguments of every member, concatenated in order."""
        if len(group) == 1:
            return (group[0].calls,)
        merged = []
        positions = list(self._signature.parameters)
        for index, (args, kwargs) in enumerate(group[0].calls):
            args, kwargs = list(args), dict(kwargs)  # the head's call, in its own form (positional or named)
            bound = [self._signature.bind(*item.calls[index][0], **item.calls[index][1]).arguments for item in group]
            for name in self._per_sample & set(bound[0]):
                values = [arguments[name] for arguments in bound]
                if values[0] is None:
                    continue
                joined = torch.cat(values) if isinstance(values[0], torch.Tensor) else [
                    row for value in values for row in value]
                if name in kwargs:
                    kwargs[name] = joined
                else:
                    args[positions.index(name)] = joined
            merged.append((tuple(args), kwargs))
        return (merged,)

    def _describe(self, calls: list[Call], exchange: bool, branches: list[str]) -> tuple[Hashable, tuple[int, ...]]:
        """The key calls must share to run as one forward, and the rows of each CFG group's call."""
        parts, rows = [exchange, tuple(branches)], []
        for args, kwargs in calls:
            call_rows = 1
            for name, value in self._signature.bind(*args, **kwargs).arguments.items():
                if name in self._per_sample and value is not None:
                    call_rows = len(value)
                    parts.append((name, _row_shape(value)))
                else:
                    parts.append((name, _value_key(value)))
            rows.append(call_rows)
        return tuple(parts), tuple(rows)


def _row_shape(value: Any) -> Hashable:
    """Per-row arguments merge when their rows have the same shapes (a list's rows may be tensors of
    their own shapes, as Z-Image's latents and captions, or values such as Qwen-Image's img_shapes:
    equal sets of row shapes, so a merged call pads no row further than its own call did)."""
    if isinstance(value, torch.Tensor):
        return "tensor", tuple(value.shape[1:]), value.dtype
    return "rows", frozenset((tuple(row.shape), row.dtype) if isinstance(row, torch.Tensor) else _value_key(row)
                             for row in value)


def _value_key(value: Any) -> Hashable:
    if isinstance(value, torch.Tensor):
        small = value.numel() <= _SMALL
        content = value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if small else id(value)
        return "tensor", tuple(value.shape), value.dtype, content
    if isinstance(value, (list, tuple)):
        return type(value).__name__, tuple(_value_key(item) for item in value)
    if isinstance(value, dict):
        return "dict", tuple(sorted((key, _value_key(item)) for key, item in value.items()))
    return value if isinstance(value, Hashable) else repr(value)


def _rows_of(output: Any, start: int, count: int) -> Any:
    """One member's rows of a forward's output: (sample, ...) with sample a tensor or a list of rows.
    The rows are views of the forward's output, which no pipeline writes to in place."""
    sample = output[0]
    return (sample[start : start + count], *output[1:])
