"""The process groups of this rank process (tensor, Ulysses and CFG parallel), asked for by name.

`initialize` runs once per rank process; every getter fails loudly before it, so a sharded layer
can never silently run as if it were alone. Each axis of the `RankLayout` has one group per
combination of the other two coordinates; this rank belongs to one of each.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import datetime
import math
import multiprocessing.sharedctypes
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional_collectives

from workers.messages import RankLayout
from workers.parallel.shm_exchange import CollectivesAborted, SharedMemoryGroup, shape_header, shapes_from_header

__all__ = ["CollectivesAborted"]  # re-exported: what a rank's collectives raise after a peer's fault

# Within a batch followers wait in a broadcast while the driver runs the VAE or the scheduler;
# between batches and during loading they wait outside any collective (forward_broadcast's
# doorbell), so this only bounds a truly stuck collective.
COLLECTIVE_TIMEOUT_S = 600.0
AXES = ("tp", "ulysses", "cfg")
_MAX_HEADER = 64


@dataclass
class _Group:
    ranks: list[int]
    index: int  # this rank's position in `ranks`
    process_group: dist.ProcessGroup | None = None
    shared_memory: SharedMemoryGroup | None = None

    @property
    def size(self) -> int:
        return len(self.ranks)


@dataclass
class _State:
    rank: int
    layout: RankLayout
    device: torch.device
    groups: dict[str, _Group]
    calls: collections.Counter = field(default_factory=collections.Counter)  # collective -> calls
    bytes: collections.Counter = field(default_factory=collections.Counter)  # collective -> bytes sent
    broken: bool = False
    # set by any rank that fails inside a batch (shared by the group's processes), cleared by `settle`
    fault_flag: ctypes.c_int = field(default_factory=lambda: multiprocessing.sharedctypes.RawValue(ctypes.c_int, 0))
    fault_message: str | None = None


_state: _State | None = None


def _current() -> _State:
    if _state is None:
        raise RuntimeError("parallel_state.initialize() has not run in this process: it is not a rank process")
    return _state


def sub_group_name(size: int) -> str:
    """The group of the driver's first `size` TP ranks (a text encoder that splits over no more)."""
    return f"tp:{size}"


def initialize(
    rank: int, layout: RankLayout, device_type: str, master_port: int,
    collective_timeout_s: float = COLLECTIVE_TIMEOUT_S, fault_flag: ctypes.c_int | None = None,
    sub_group_sizes: tuple[int, ...] = (),
) -> None:
    """Join the world (NCCL on CUDA, gloo on CPU) over loopback, then every axis group and the
    driver's TP sub-groups of `sub_group_sizes`; no process group at world size 1. On x86 CPUs each
    group of two or more also gets a shared-memory exchange. `fault_flag`: a shared int every rank
    of the group was given (see `report_fault`)."""
    global _state
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    driver_tp = next(g for g in layout.groups("tp") if 0 in g)
    every = {axis: layout.groups(axis) for axis in AXES}
    every.update({sub_group_name(size): [driver_tp[:size]] for size in sorted(set(sub_group_sizes))})
    groups = {}
    for name, candidates in every.items():
        mine = next((g for g in candidates if rank in g), [rank])
        groups[name] = _Group(mine, mine.index(rank))
    _state = _State(rank, layout, device, groups)
    if fault_flag is not None:
        _state.fault_flag = fault_flag
    if layout.world_size == 1:
        return
    timeout = datetime.timedelta(seconds=collective_timeout_s)
    dist.init_process_group(
        backend="nccl" if device_type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{master_port}",
        rank=rank,
        world_size=layout.world_size,
        timeout=timeout,
        device_id=device if device_type == "cuda" else None,
    )
    use_shared_memory = device_type == "cpu" and SharedMemoryGroup.supported()
    for axis, candidates in every.items():
        for ranks in candidates:  # every rank creates every group, in the same order
            if len(ranks) == 1:
                continue
            process_group = dist.new_group(ranks, timeout=timeout) if len(ranks) < layout.world_size else None
            if rank not in ranks:
                continue
            group = groups[axis]
            group.process_group = process_group
            if use_shared_memory:
                name = f"ditserve-{os.getppid()}-{master_port}-{axis.replace(':', '')}-{ranks[0]}"
                group.shared_memory = SharedMemoryGroup(group.index, group.size, name, collective_timeout_s,
                                                        process_group, aborted=lambda: bool(_state.fault_flag.value))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device() -> torch.device:
    return _current().device


def layout() -> RankLayout:
    return _current().layout


def rank() -> int:
    return _current().rank


def rank_in(axis: str) -> int:
    """This rank's position along `axis` ("tp", "ulysses" or "cfg")."""
    return _current().groups[axis].index


def size_of(axis: str) -> int:
    return _current().groups[axis].size


def all_reduce(tensor: torch.Tensor, group_name: str = "tp") -> torch.Tensor:
    """The sum of `tensor` over the tensor-parallel group (or a sub-group of it): `tensor` itself
    summed in place (a process group) or a new tensor (shared memory), so use the result. Inside a
    compiled graph it is one node rather than a graph break: PyTorch's traceable functional
    all-reduce on a process group, the `ditserve::all_reduce` op on shared memory."""
    group = _current().groups[group_name]
    if group.size == 1:
        return tensor
    if torch.compiler.is_compiling():
        if group.shared_memory is None:
            return functional_collectives.all_reduce(tensor, "sum", group.process_group or dist.group.WORLD)
        return torch.ops.ditserve.all_reduce(tensor)
    count("all_reduce", tensor.nbytes)
    with collective():
        if group.shared_memory is not None:
            return group.shared_memory.all_reduce(tensor)
        dist.all_reduce(tensor, group=group.process_group)
    return tensor


def all_reduce_max(tensor: torch.Tensor, group_name: str = "tp") -> torch.Tensor:
    """The elementwise maximum of `tensor` over the tensor-parallel group or a sub-group (a process
    group: the scaled-FP8 path on GPUs, the only caller)."""
    group = _current().groups[group_name]
    if group.size == 1:
        return tensor
    if torch.compiler.is_compiling():
        return functional_collectives.all_reduce(tensor, "max", group.process_group or dist.group.WORLD)
    count("all_reduce", tensor.nbytes)
    with collective():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group.process_group)
    return tensor


@torch.library.custom_op("ditserve::all_reduce", mutates_args=())
def _summed_through_shared_memory(tensor: torch.Tensor) -> torch.Tensor:
    """The shared-memory all-reduce as an op a compiled graph calls (its shape is its input's; it
    returns a new tensor, as an op must)."""
    return all_reduce(tensor)


@_summed_through_shared_memory.register_fake
def _(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(tensor)


def all_gather(tensors: list[torch.Tensor], axis: str) -> list[list[torch.Tensor]]:
    """Every member's `tensors` along `axis`, in member order; shapes may differ between members."""
    group = _current().groups[axis]
    if group.size == 1:
        return [list(tensors)]
    count(f"{axis}_all_gather", sum(t.nbytes for t in tensors))
    with collective():
        if group.shared_memory is not None:
            return group.shared_memory.all_gather(tensors)
        return _gather_through_dist(tensors, group)


def all_to_all(pieces: list[torch.Tensor], axis: str) -> list[torch.Tensor]:
    """pieces[j] goes to member j; returns what each member addressed to this one, in member order."""
    group = _current().groups[axis]
    if group.size == 1:
        return list(pieces)
    mine = pieces[group.index]
    count(f"{axis}_all_to_all", sum(p.nbytes for p in pieces) - mine.nbytes)
    with collective():
        if group.shared_memory is not None:
            return group.shared_memory.all_to_all(pieces)
        if dist.get_backend(group.process_group) != "nccl":  # gloo's all-to-all needs equal shapes
            return [member[group.index] for member in _gather_through_dist(pieces, group)]
        shapes = _gather_shapes([p.shape for p in pieces], group)
        received = [torch.empty(member[group.index], dtype=mine.dtype, device=mine.device) for member in shapes]
        dist.all_to_all(received, [p.contiguous() for p in pieces], group=group.process_group)
        return received


def _gather_shapes(shapes: list, group: _Group) -> list[list[tuple[int, ...]]]:
    """Every member's list of shapes (one small all-gather of a fixed-size header)."""
    header = shape_header(shapes)
    if len(header) > _MAX_HEADER:
        raise ValueError(f"too many dimensions for one exchange ({len(header)} header values)")
    padded = torch.zeros(_MAX_HEADER, dtype=torch.int64, device=_current().device)
    padded[: len(header)] = torch.tensor(header)
    headers = [torch.empty_like(padded) for _ in range(group.size)]
    dist.all_gather(headers, padded, group=group.process_group)
    return [shapes_from_header(h.tolist()) for h in headers]


def _gather_through_dist(tensors: list[torch.Tensor], group: _Group) -> list[list[torch.Tensor]]:
    """The collective library's uneven all-gather: shapes first, then the flattened payloads
    padded to the longest."""
    device = _current().device
    member_shapes = _gather_shapes([t.shape for t in tensors], group)
    dtype = tensors[0].dtype
    flat = torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.empty(0, dtype=dtype, device=device)
    longest = max(sum(math.prod(s) for s in member) for member in member_shapes)
    buffers = [torch.empty(longest, dtype=dtype, device=device) for _ in range(group.size)]
    dist.all_gather(buffers, torch.nn.functional.pad(flat, (0, longest - flat.numel())), group=group.process_group)
    gathered = []
    for member, (buffer, member_shape) in enumerate(zip(buffers, member_shapes)):
        if member == group.index:
            gathered.append(list(tensors))
            continue
        offset, unpacked = 0, []
        for shape in member_shape:
            count = math.prod(shape)
            unpacked.append(buffer[offset : offset + count].view(shape))
            offset += count
        gathered.append(unpacked)
    return gathered


@contextlib.contextmanager
def collective(abortable: bool = True) -> Iterator[None]:
    """Wrap every collective: one that fails (a peer died, a timeout) breaks the whole group.

    After a rank's fault (`report_fault`) an abortable collective raises CollectivesAborted instead
    of waiting for a rank that will not come; the driver's broadcasts are not abortable: they are
    how the ranks meet again at the batch's end (`settle`)."""
    state = _current()
    if abortable and state.fault_flag.value:
        raise CollectivesAborted("a peer rank failed in this batch: collectives are abandoned until it ends")
    try:
        yield
    except CollectivesAborted:
        raise
    except Exception:
        state.broken = True
        raise


def group_broken() -> bool:
    return _current().broken


def faulted() -> bool:
    """A rank reported a fault in the current batch: its collectives abort until it is settled."""
    return _state is not None and bool(_state.fault_flag.value)


def report_fault(error: BaseException) -> None:
    """This rank failed inside a batch. Every rank's collectives stop waiting (CollectivesAborted)
    until the batch ends, so no peer waits in one this rank will never join; an abort is not a
    cause, so only the first other error is kept, for `settle` to report."""
    state = _current()
    if state.fault_message is None and not isinstance(error, CollectivesAborted):
        state.fault_message = f"rank {state.rank}: {type(error).__name__}: {error}"
    state.fault_flag.value = 1


def settle() -> str | None:
    """At the end of every batch, on every rank (the driver's IDLE): did any rank fail in it? If so,
    the exchanges forget the abandoned calls, so the next batch starts in step, and every rank gets
    the same answer: the lowest failed rank's error. A failure here (a peer died) breaks the group."""
    state = _current()
    messages = [state.fault_message]
    if state.layout.world_size > 1:
        # one small all-reduce when no rank failed (every batch); the messages only when one did
        failed = torch.tensor([messages[0] is not None], dtype=torch.int32, device=state.device)
        with collective(abortable=False):
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if not failed.item():
            return None
        messages = [None] * state.layout.world_size
        with collective(abortable=False):
            dist.all_gather_object(messages, state.fault_message)
    cause = next((m for m in messages if m is not None), None)  # the same on every rank
    if cause is None:  # no rank failed (an abort always follows some rank's error)
        return None
    for group in state.groups.values():
        if group.shared_memory is not None:
            group.shared_memory.reset()
    if state.layout.world_size > 1:
        with collective(abortable=False):
            dist.barrier()
    # Rank 0 clears the flag, before it sends anything of the next batch: a follower that cleared
    # it late could wipe a fault of that batch.
    if state.rank == 0:
        state.fault_flag.value = 0
    state.fault_message = None
    return cause


def count(name: str, nbytes: int) -> None:
    """Record one collective call and the bytes this rank sent (collective_counters)."""
    state = _current()
    state.calls[name] += 1
    state.bytes[name] += nbytes


def collective_counters() -> dict[str, tuple[int, int]]:
    """collective -> (calls, bytes this rank sent) since the last reset, for the benchmarks."""
    state = _current()
    return {name: (state.calls[name], state.bytes[name]) for name in state.calls}


def reset_collective_counters() -> None:
    state = _current()
    state.calls.clear()
    state.bytes.clear()
