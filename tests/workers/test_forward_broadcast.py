"""The driver's broadcast of a forward call's arguments arrives whole on a follower, over real gloo."""

from __future__ import annotations

import pickle
import time

import torch

from engine.host import free_port
from tests.helpers import rank_context, run_ranks
from workers import RankLayout
from workers.parallel import forward_broadcast, parallel_state


def sent_tree() -> tuple:
    """Every shape of argument a diffusers transformer call passes: tensors of several dtypes
    (bool masks included), None, numbers, strings, and nested tuples, lists and dicts."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 3, 4, generator=generator)
    args = (hidden, None, 7, [torch.arange(5), (torch.tensor(2.5, dtype=torch.float64), "text")])
    kwargs = {
        "attention_mask": torch.tensor([[True, False, True]]),
        "nested": {"ids": torch.tensor([[1, 2]], dtype=torch.int64), "none": None, "scale": 0.5},
        "half": torch.randn(3, generator=generator).to(torch.bfloat16),
        "transposed": hidden[0].t(),  # not contiguous
        "empty": (),
    }
    return args, kwargs


def exchange(rank: int, port: int, results) -> None:
    parallel_state.initialize(rank, RankLayout(tensor_parallel_size=2), "cpu", port)
    if rank == 0:
        forward_broadcast.send(forward_broadcast.FORWARD, sent_tree())
        forward_broadcast.send(forward_broadcast.STOP)
    else:
        received = [forward_broadcast.receive() for _ in range(2)]
        # plain pickle copies the tensors' bytes; the queue's own reducer would share them through a
        # file descriptor that dies with this process, before the test may read it
        results.put(pickle.dumps(received))
    parallel_state.shutdown()


def assert_same_tree(got, expected) -> None:
    assert type(got) is type(expected), (type(got), type(expected))
    if isinstance(expected, torch.Tensor):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got, expected)
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert_same_tree(a, b)
    elif isinstance(expected, dict):
        assert list(got) == list(expected)
        for key in expected:
            assert_same_tree(got[key], expected[key])
    else:
        assert got == expected


def test_forward_arguments_round_trip_to_a_follower():
    context = rank_context()
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=exchange, args=(rank, port, results)) for rank in range(2)]
    for process in processes:
        process.start()
    (forward, tree), (stop, nothing) = pickle.loads(results.get(timeout=120))
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    assert (forward, stop, nothing) == (forward_broadcast.FORWARD, forward_broadcast.STOP, None)
    assert_same_tree(tree, sent_tree())


class Doubler(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.sums: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sums.append(float(x.sum()) * 2)
        return x * 2


def slow_driver_and_follower(rank: int, world_size: int, port: int, doorbells, results) -> None:
    parallel_state.initialize(rank, RankLayout(tensor_parallel_size=world_size), "cpu", port,
                              collective_timeout_s=1.0)
    if rank == 0:
        time.sleep(4.0)  # a rank-0 load four times longer than any collective may wait
        forward_broadcast.ring(doorbells)
        forward_broadcast.send(forward_broadcast.FORWARD, ("double", [((torch.ones(3),), {})], False))
        forward_broadcast.end_batch()
        time.sleep(2.0)  # idle between batches, again longer than the collective timeout
        forward_broadcast.ring(doorbells)
        forward_broadcast.send(forward_broadcast.FORWARD, ("double", [((torch.ones(2),), {})], False))
        forward_broadcast.end_batch()
        forward_broadcast.ring(doorbells)
        forward_broadcast.send(forward_broadcast.STOP)
        results.put((rank, []))
    else:
        module = Doubler()
        handlers = {"double": lambda calls, exchange: module(*calls[0][0], **calls[0][1])}
        forward_broadcast.follow(handlers, doorbells[rank - 1], lambda: True)
        results.put((rank, module.sums))
    parallel_state.shutdown()


def test_followers_wait_out_a_slow_driver_outside_any_timed_collective():
    doorbells = [rank_context().Queue()]
    (_, _), (_, follower_sums) = run_ranks(slow_driver_and_follower, 2, doorbells, timeout_s=120)
    assert follower_sums == [6.0, 4.0]  # both forwards ran on the follower; neither rank timed out
