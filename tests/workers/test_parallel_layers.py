"""The TP core as a reader meets it: layers that print their shard, state that fails before set-up,
and the driver's bounded memory of cancelled requests."""

from __future__ import annotations

import queue

import pytest
import torch

from workers.parallel import parallel_state
from workers.parallel.parallel_linear import ColumnParallelLinear, RowParallelLinear, shard_slices
from workers.worker_process import CancelledIds


def test_parallel_linears_say_which_slice_they_hold_and_whether_they_all_reduce():
    column = ColumnParallelLinear(96, [(32, 64)], bias=True, device="meta")
    row = RowParallelLinear([(0, 16), (96, 112)], 96, bias=False, device="meta")
    assert repr(column) == "ColumnParallelLinear(in_features=96, out_features=[32:64], bias=True, no all-reduce)"
    assert repr(row) == "RowParallelLinear(in_features=[0:16]+[96:112], out_features=96, bias=False, all-reduce)"
    assert (column.out_features, row.in_features) == (32, 32)
    assert shard_slices(column.weight).dim == 0 and shard_slices(column.bias).ranges == [(32, 64)]
    assert shard_slices(row.weight).dim == 1 and row.bias is None


def test_parallel_state_refuses_to_answer_before_initialize():
    # pytest's own process never joins a group.
    with pytest.raises(RuntimeError, match="initialize"):
        parallel_state.device()
    with pytest.raises(RuntimeError, match="initialize"):
        parallel_state.all_reduce(torch.ones(2))


class _ListQueue:
    def __init__(self, items):
        self.items = list(items)

    def get_nowait(self):
        if not self.items:
            raise queue.Empty
        return self.items.pop(0)


def test_cancelled_ids_remember_the_newest_few_hundred_only():
    ids = [f"request-{i}" for i in range(CancelledIds._REMEMBERED + 100)]
    cancelled = CancelledIds(_ListQueue(ids))
    assert ids[-1] in cancelled
    assert ids[100] in cancelled and ids[99] not in cancelled  # the oldest 100 were forgotten
    assert len(cancelled._ids) == CancelledIds._REMEMBERED
    assert "never-cancelled" not in cancelled
