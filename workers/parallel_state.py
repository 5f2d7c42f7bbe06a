"""The tensor-parallel process group of this rank process, asked for by name from anywhere.

`initialize` runs once per rank process; every getter fails loudly before it, so a sharded layer
can never silently run as if it were alone.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from workers.shm_all_reduce import SharedMemoryAllReduce

# Within a batch followers wait in a broadcast while the driver runs the VAE or the scheduler;
# between batches and during loading they wait outside any collective (forward_broadcast's
# doorbell), so this only bounds a truly stuck collective.
COLLECTIVE_TIMEOUT_S = 600.0


@dataclass
class _State:
    rank: int
    world_size: int
    device: torch.device
    all_reduce_calls: int = 0
    all_reduce_bytes: int = 0
    broken: bool = False
    shm_all_reduce: SharedMemoryAllReduce | None = None


_state: _State | None = None


def _current() -> _State:
    if _state is None:
        raise RuntimeError("parallel_state.initialize() has not run in this process: it is not a rank process")
    return _state


def initialize(
    rank: int, world_size: int, device_type: str, master_port: int, collective_timeout_s: float = COLLECTIVE_TIMEOUT_S
) -> None:
    """Join the group (NCCL on CUDA, gloo on CPU) over loopback; no process group at world size 1."""
    global _state
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    _state = _State(rank, world_size, device)
    if world_size == 1:
        return
    dist.init_process_group(
        backend="nccl" if device_type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{master_port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=collective_timeout_s),
        device_id=device if device_type == "cuda" else None,
    )
    if device_type == "cpu" and SharedMemoryAllReduce.supported():
        _state.shm_all_reduce = SharedMemoryAllReduce(
            rank, world_size, f"ditserve-{os.getppid()}-{master_port}", collective_timeout_s
        )


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device() -> torch.device:
    return _current().device


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the group in place (counted, for the benchmarks)."""
    state = _current()
    if state.world_size == 1:
        return tensor
    state.all_reduce_calls += 1
    state.all_reduce_bytes += tensor.numel() * tensor.element_size()
    with collective():
        if state.shm_all_reduce is not None:
            state.shm_all_reduce(tensor)
        else:
            dist.all_reduce(tensor)
    return tensor


@contextlib.contextmanager
def collective() -> Iterator[None]:
    """Wrap every collective: one that fails (a peer died, a timeout) breaks the whole group."""
    state = _current()
    try:
        yield
    except Exception:
        state.broken = True
        raise


def group_broken() -> bool:
    return _current().broken


def all_reduce_counters() -> tuple[int, int]:
    state = _current()
    return state.all_reduce_calls, state.all_reduce_bytes


def reset_all_reduce_counters() -> None:
    state = _current()
    state.all_reduce_calls = state.all_reduce_bytes = 0
