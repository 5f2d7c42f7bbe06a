"""Collectives among the CPU ranks of one group on one machine, through /dev/shm.

gloo's TCP all-reduce costs ~4 ms for 3 MiB on loopback; copying through /dev/shm costs a
fraction of that. One primitive does everything: each member writes its tensors (with a header of
their shapes) into its own slot, signals arrival with a sequence number, waits for every member,
then reads the others' slots. An all-reduce sums the gathered copies in member order, so every
rank gets bitwise the same result; an all-to-all keeps the piece addressed to it. Two slot sets
alternate: arriving at call k proves a member finished reading call k-1, so one barrier per round
suffices. Payloads larger than a slot go through in rounds.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

SLOT_BYTES = 8 * 2**20
_HEADER_INTS = 256
_HEADER_BYTES = 8 * _HEADER_INTS
_DATA_BYTES = SLOT_BYTES - _HEADER_BYTES
_SPINS_BEFORE_YIELD = 1000
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.bool,
           torch.uint8, torch.complex64)


class CollectivesAborted(RuntimeError):
    """Another rank failed in this batch: this collective will not complete, the batch is abandoned."""


class SharedMemoryGroup:
    def __init__(self, index: int, size: int, name: str, timeout_s: float, group: dist.ProcessGroup | None = None,
                 aborted: Callable[[], bool] = lambda: False):
        self.index, self.size, self.timeout_s, self._aborted = index, size, timeout_s, aborted
        path = Path("/dev/shm") / name
        flags_bytes = 8 * size
        total = flags_bytes + 2 * size * SLOT_BYTES
        if index == 0:
            with open(path, "wb") as handle:
                handle.truncate(total)
        dist.barrier(group=group)
        storage = torch.from_file(str(path), shared=True, size=total, dtype=torch.uint8)
        dist.barrier(group=group)
        if index == 0:
            os.unlink(path)  # mapped by every member: nothing is left behind, even after a crash
        self._arrived = storage[:flags_bytes].view(torch.int64)
        self._slots = storage[flags_bytes:].view(2, size, SLOT_BYTES)
        self._sequence = 0

    def reset(self) -> None:
        """Forget every call, once every member has stopped exchanging (after an aborted batch some
        members arrived at calls the others never reached); followed by a barrier of all members."""
        self._sequence = 0
        self._arrived[self.index] = 0

    @staticmethod
    def supported() -> bool:
        # Relies on x86's total store order: a member's slot write is visible before its flag.
        return platform.machine().lower() in ("x86_64", "amd64") and Path("/dev/shm").is_dir()

    def all_gather(self, tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Every member's `tensors` (one dtype per call, any shapes, any count), in member order.
        This member's own entry is its input, not a copy."""
        return self._exchange(tensors, lambda member, count: range(count))

    def all_to_all(self, pieces: list[torch.Tensor]) -> list[torch.Tensor]:
        """pieces[j] goes to member j; what each member addressed to this one, in member order.
        Only those pieces are read."""
        return [entry[0] for entry in self._exchange(pieces, lambda member, count: [self.index])]

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over the members, in a new tensor (`tensor` is left as it was); the same bits on
        every member."""
        parts = [entry[0] for entry in self.all_gather([tensor])]
        total = parts[0] + parts[1]
        for part in parts[2:]:
            total.add_(part)
        return total

    def _exchange(self, tensors: list[torch.Tensor], wanted) -> list[list[torch.Tensor]]:
        """Write `tensors` (straight into the slot, in rounds), read from every other member the
        ones `wanted(member, its tensor count)` names; this member's own are returned as given."""
        dtype = tensors[0].dtype if tensors else torch.float32
        header = [_DTYPES.index(dtype), *shape_header([t.shape for t in tensors])]
        if len(header) > _HEADER_INTS:
            raise ValueError(f"too many tensors for one shared-memory exchange ({len(tensors)})")
        mine = [t.reshape(-1).view(torch.uint8) for t in tensors]
        slots = self._arrive(mine, 0, header)
        headers = [slots[m, :_HEADER_BYTES].view(torch.int64).tolist() for m in range(self.size)]
        outputs, reads = [], []  # per member: its wanted tensors; (member, byte range, destination bytes)
        for member, member_header in enumerate(headers):
            shapes, member_dtype = _shapes(member_header), _DTYPES[member_header[0]]
            if member == self.index:
                outputs.append([tensors[i] for i in wanted(member, len(tensors))])
                continue
            offsets = _byte_offsets(shapes, member_dtype)
            received = []
            for index in wanted(member, len(shapes)):
                tensor = torch.empty(shapes[index], dtype=member_dtype)
                received.append(tensor)
                reads.append((member, offsets[index], offsets[index + 1], tensor.view(-1).view(torch.uint8)))
            outputs.append(received)
        rounds = max(1, math.ceil(max(_byte_offsets(_shapes(h), _DTYPES[h[0]])[-1] for h in headers) / _DATA_BYTES))
        for round_index in range(rounds):
            window = round_index * _DATA_BYTES
            if round_index:
                slots = self._arrive(mine, window, None)
            for member, first, last, destination in reads:
                a, b = max(first, window), min(last, window + _DATA_BYTES)
                if a < b:
                    destination[a - first : b - first].copy_(slots[member, _HEADER_BYTES + a - window :
                                                                    _HEADER_BYTES + b - window])
        return outputs

    def _arrive(self, payload: list[torch.Tensor], window: int, header: list[int] | None) -> torch.Tensor:
        """Write the bytes [window, window + a slot) of the concatenated `payload`, then wait for all."""
        self._sequence += 1
        slots = self._slots[self._sequence % 2]
        mine = slots[self.index]
        if header is not None:
            mine[:_HEADER_BYTES].view(torch.int64)[: len(header)] = torch.tensor(header, dtype=torch.int64)
        offset = 0
        for piece in payload:
            a, b = max(offset, window), min(offset + piece.numel(), window + _DATA_BYTES)
            if a < b:
                mine[_HEADER_BYTES + a - window : _HEADER_BYTES + b - window].copy_(piece[a - offset : b - offset])
            offset += piece.numel()
        self._arrived[self.index] = self._sequence
        self._wait_for_all()
        return slots

    def _wait_for_all(self) -> None:
        spins, deadline = 0, time.monotonic() + self.timeout_s
        while int(self._arrived.min()) < self._sequence:
            spins += 1
            if spins % _SPINS_BEFORE_YIELD == 0:
                time.sleep(0)  # oversubscribed cores: let the other ranks run
                if self._aborted():
                    raise CollectivesAborted("a peer rank failed: this exchange was abandoned")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"shared-memory exchange: ranks did not arrive within {self.timeout_s:.0f} s")


def shape_header(shapes: list) -> list[int]:
    """Shapes as integers: [count, ndim, dims..., ndim, dims...] (read back by `shapes_from_header`)."""
    header = [len(shapes)]
    for shape in shapes:
        header += [len(shape), *shape]
    return header


def shapes_from_header(header: list[int]) -> list[tuple[int, ...]]:
    shapes, position = [], 1
    for _ in range(header[0]):
        ndim = header[position]
        shapes.append(tuple(header[position + 1 : position + 1 + ndim]))
        position += 1 + ndim
    return shapes


def _shapes(header: list[int]) -> list[tuple[int, ...]]:
    return shapes_from_header(header[1:])  # after the dtype


def _byte_offsets(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[int]:
    """Where each tensor starts in a member's payload, and (last) where the payload ends."""
    offsets = [0]
    for shape in shapes:
        offsets.append(offsets[-1] + math.prod(shape) * dtype.itemsize)
    return offsets
