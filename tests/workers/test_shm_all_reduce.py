"""The shared-memory all-reduce sums exactly and gives every rank bitwise the same result."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from engine.worker_group import free_port
from workers import parallel_state
from workers.shm_all_reduce import SLOT_BYTES, SharedMemoryAllReduce

WORLD_SIZE = 3


def contribution(rank: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(rank))


def reduce_on_rank(rank: int, port: int, shapes: list, results) -> None:
    torch.set_num_threads(1)
    parallel_state.initialize(rank, WORLD_SIZE, "cpu", port)
    outputs = []
    for shape in shapes:
        tensor = contribution(rank, shape)
        outputs.append(parallel_state.all_reduce(tensor.t() if len(shape) == 2 else tensor).numpy().copy())
    results.put((rank, outputs))
    parallel_state.shutdown()


@pytest.mark.skipif(not SharedMemoryAllReduce.supported(), reason="shared-memory all-reduce needs x86 and /dev/shm")
def test_sum_is_exact_identical_on_every_rank_and_chunks_large_tensors():
    large = (SLOT_BYTES // 4) * 2 + 123  # three chunks
    shapes = [(5,), (large,), (64, 48)]  # the 2-D one is reduced as a non-contiguous transpose
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=reduce_on_rank, args=(r, port, shapes, results)) for r in range(WORLD_SIZE)]
    for process in processes:
        process.start()
    received = (results.get(timeout=120) for _ in range(WORLD_SIZE))
    outputs = {rank: [torch.from_numpy(a) for a in arrays] for rank, arrays in received}
    for process in processes:
        process.join(timeout=30)
    for index, shape in enumerate(shapes):
        parts = [contribution(r, shape) for r in range(WORLD_SIZE)]
        expected = (parts[0] + parts[1] + parts[2])
        expected = expected.t() if len(shape) == 2 else expected
        for rank in range(WORLD_SIZE):
            assert torch.equal(outputs[rank][index], outputs[0][index])
        torch.testing.assert_close(outputs[0][index], expected, rtol=0, atol=1e-5)
