"""The group collectives (shared memory on x86 CPUs, gloo otherwise): exact sums, bitwise equal on
every rank, uneven shapes and payloads larger than a shared-memory slot."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import run_ranks
from workers import RankLayout
from workers.parallel import parallel_state
from workers.parallel.shm_exchange import SLOT_BYTES, SharedMemoryGroup

WORLD_SIZE = 3
LARGE = (SLOT_BYTES // 4) * 2 + 123  # three rounds through a slot


def contribution(rank: int, shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(rank)).to(dtype)


def collectives_on_rank(rank: int, world_size: int, port: int, through_gloo: bool, results) -> None:
    torch.set_num_threads(1)
    parallel_state.initialize(rank, RankLayout(ulysses_degree=world_size), "cpu", port)
    if through_gloo:  # the path of non-x86 CPUs (and, with NCCL, of GPUs)
        parallel_state._current().groups["ulysses"].shared_memory = None
    gathered = parallel_state.all_gather([contribution(rank, (rank + 1, 4)), torch.full((2,), float(rank))],
                                         "ulysses")
    masks = parallel_state.all_gather([torch.arange(rank + 2) % 2 == 0], "ulysses")
    pieces = [torch.full((rank + 1, j + 1), float(10 * rank + j)) for j in range(world_size)]
    received = parallel_state.all_to_all(pieces, "ulysses")
    results.put((rank, [[t.numpy().copy() for t in member] for member in gathered],
                 [m[0].numpy().copy() for m in masks], [t.numpy().copy() for t in received]))
    parallel_state.shutdown()


def reduce_on_rank(rank: int, world_size: int, port: int, results) -> None:
    torch.set_num_threads(1)
    parallel_state.initialize(rank, RankLayout(tensor_parallel_size=world_size), "cpu", port)
    outputs = []
    for shape in [(5,), (LARGE,), (64, 48)]:
        tensor = contribution(rank, shape)
        outputs.append(parallel_state.all_reduce(tensor.t() if len(shape) == 2 else tensor).numpy().copy())
    results.put((rank, outputs))
    parallel_state.shutdown()


@pytest.mark.skipif(not SharedMemoryGroup.supported(), reason="shared-memory collectives need x86 and /dev/shm")
def test_all_reduce_is_exact_identical_on_every_rank_and_goes_in_rounds():
    received = run_ranks(reduce_on_rank, WORLD_SIZE)
    for index, shape in enumerate([(5,), (LARGE,), (64, 48)]):
        parts = [contribution(r, shape) for r in range(WORLD_SIZE)]
        expected = parts[0] + parts[1] + parts[2]
        expected = expected.t() if len(shape) == 2 else expected
        for _, outputs in received:
            assert (outputs[index] == received[0][1][index]).all()
        torch.testing.assert_close(torch.from_numpy(received[0][1][index]), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("through_gloo", [False, True], ids=["shared-memory", "gloo"])
def test_uneven_all_gather_and_all_to_all(through_gloo):
    if not through_gloo and not SharedMemoryGroup.supported():
        pytest.skip("shared-memory collectives need x86 and /dev/shm")
    received = run_ranks(collectives_on_rank, WORLD_SIZE, through_gloo)
    for rank, gathered, masks, pieces in received:
        for member in range(WORLD_SIZE):
            assert torch.equal(torch.from_numpy(gathered[member][0]), contribution(member, (member + 1, 4)))
            assert torch.equal(torch.from_numpy(gathered[member][1]), torch.full((2,), float(member)))
            assert torch.equal(torch.from_numpy(masks[member]), torch.arange(member + 2) % 2 == 0)
            assert torch.equal(torch.from_numpy(pieces[member]),
                               torch.full((member + 1, rank + 1), float(10 * member + rank)))
