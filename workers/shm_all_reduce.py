"""All-reduce through shared memory for CPU ranks on one machine.

gloo's TCP all-reduce costs ~4 ms for 3 MiB on loopback; copying through /dev/shm costs a
fraction of that. Each rank writes its tensor into its own slot, signals arrival with a sequence
number, waits for every rank, then sums all slots in rank order, so every rank gets bitwise the
same result. Two slot sets alternate: arriving at call k proves a rank finished reading call k-1,
so one barrier per call suffices. Tensors larger than a slot go through in chunks.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch
import torch.distributed as dist

SLOT_BYTES = 8 * 2**20
_SPINS_BEFORE_YIELD = 1000


class SharedMemoryAllReduce:
    def __init__(self, rank: int, world_size: int, name: str, timeout_s: float):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        path = Path("/dev/shm") / name
        flags_bytes = 8 * world_size
        total = flags_bytes + 2 * world_size * SLOT_BYTES
        if rank == 0:
            with open(path, "wb") as handle:
                handle.truncate(total)
        dist.barrier()
        storage = torch.from_file(str(path), shared=True, size=total, dtype=torch.uint8)
        dist.barrier()
        if rank == 0:
            os.unlink(path)  # mapped by every rank: nothing is left behind, even after a crash
        self._arrived = storage[:flags_bytes].view(torch.int64)
        self._slots = storage[flags_bytes:].view(2, world_size, SLOT_BYTES)
        self._sequence = 0

    @staticmethod
    def supported() -> bool:
        # Relies on x86's total store order: a rank's slot write is visible before its flag.
        return platform.machine().lower() in ("x86_64", "amd64") and Path("/dev/shm").is_dir()

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        flat = tensor.view(-1) if tensor.is_contiguous() else tensor.reshape(-1)
        per_chunk = SLOT_BYTES // flat.element_size()
        for start in range(0, flat.numel(), per_chunk):
            self._reduce_chunk(flat[start : start + per_chunk])
        if flat.data_ptr() != tensor.data_ptr():
            tensor.copy_(flat.view_as(tensor))
        return tensor

    def _reduce_chunk(self, chunk: torch.Tensor) -> None:
        self._sequence += 1
        slots = self._slots[self._sequence % 2]
        count, nbytes = chunk.numel(), chunk.numel() * chunk.element_size()
        views = [slots[r, :nbytes].view(chunk.dtype) for r in range(self.world_size)]
        views[self.rank].copy_(chunk)
        self._arrived[self.rank] = self._sequence
        self._wait_for_all()
        chunk.copy_(views[0][:count])
        for view in views[1:]:
            chunk.add_(view[:count])

    def _wait_for_all(self) -> None:
        spins, deadline = 0, time.monotonic() + self.timeout_s
        while int(self._arrived.min()) < self._sequence:
            spins += 1
            if spins % _SPINS_BEFORE_YIELD == 0:
                time.sleep(0)  # oversubscribed cores: let the other ranks run
                if time.monotonic() > deadline:
                    raise TimeoutError(f"shared-memory all-reduce: ranks did not arrive within {self.timeout_s:.0f} s")
