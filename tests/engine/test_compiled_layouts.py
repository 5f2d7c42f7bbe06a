"""Qwen-Image's true-CFG DiT step (two calls, text of 12 and 5 tokens) compiled equals eager within
fp32 rounding at TP=1, TP=2 and Ulysses=2, in one graph per block kind (the collectives are nodes
of it, not breaks), and compiles nothing after its first step. The DiT runs alone on real rank
processes: compiling is the cost here, not the pipeline around it."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import rank_context, run_ranks
from workers import RankLayout
from workers.parallel import forward_broadcast
from workers.parallel.cfg_parallel import DitExecutor, follower_handlers, install_dispatcher

SIZE = 64


def _eager_and_compiled_dit_calls(rank, world_size, port, layout, path, steps, doorbells, results):
    """The tiny Qwen-Image DiT's true-CFG step (cond with 12 text tokens, uncond with 5) for `steps`
    steps, by an eager copy and a compiled copy of the DiT on the same ranks: the last outputs of
    each, and what compiled in all and after the first step."""
    import torch

    from configs import load_family
    from workers.parallel import parallel_state
    from workers.parallel.compiled_blocks import compile_stats
    from workers.parallel.sharded_loading import dit_component, load_component_shard

    torch.set_num_threads(1)
    parallel_state.initialize(rank, layout, "cpu", port)
    family = load_family("qwen-image")
    dits, executors, handlers = {}, {}, {}
    for name in ("eager", "compiled"):
        dits[name] = load_component_shard(dit_component(family), path, parallel_state.rank_in("tp"),
                                          parallel_state.size_of("tp"), torch.device("cpu"), torch.float32)
        executors[name] = DitExecutor(dits[name], family.sequence_parallel, compiled=name == "compiled")
        handlers.update(follower_handlers(name, executors[name], {}))
    if rank:
        forward_broadcast.follow(handlers, doorbells[rank - 1], lambda: True)
        parallel_state.shutdown()
        return
    dispatchers = {name: install_dispatcher(name, dits[name], executors[name], family.cfg_parallel) for name in dits}
    config = dits["eager"].config
    generator = torch.Generator().manual_seed(0)
    side = SIZE // 16
    latents = torch.randn(1, side * side, config.in_channels, generator=generator)
    calls = [dict(hidden_states=latents, timestep=torch.tensor([0.5]), guidance=None,
                  encoder_hidden_states=torch.randn(1, tokens, config.joint_attention_dim, generator=generator),
                  encoder_hidden_states_mask=torch.ones(1, tokens, dtype=torch.long), img_shapes=[[(1, side, side)]],
                  return_dict=False) for tokens in (12, 5)]
    forward_broadcast.ring(doorbells)
    outputs = {}
    with torch.inference_mode():
        for name, dit in dits.items():
            dispatchers[name].begin(pairs=True)
            for step in range(steps):
                if step == 1 and name == "compiled":
                    after_first_step = compile_stats()
                outputs[name] = [dit(**call)[0].numpy().copy() for call in calls]
                dispatchers[name].check_settled()
    if world_size > 1:
        forward_broadcast.send(forward_broadcast.STOP)
    results.put((rank, outputs, compile_stats(), compile_stats() - after_first_step))
    parallel_state.shutdown()


@pytest.mark.parametrize("layout", [RankLayout(), RankLayout(tensor_parallel_size=2), RankLayout(ulysses_degree=2)],
                         ids=["tp1", "tp2", "ulysses2"])
def test_true_cfg_dit_compiled_equals_eager_in_one_graph_per_block(tiny_dir, layout):
    """Qwen-Image's true-CFG step: compiled = eager within fp32 rounding; no graph break (at TP=2 and
    Ulysses=2 the collectives are inside the block's graph); nothing compiled after the first step."""
    doorbells = [rank_context().Queue() for _ in range(layout.world_size - 1)]
    [(_, outputs, total, later)] = run_ranks(_eager_and_compiled_dit_calls, layout.world_size, layout,
                                             tiny_dir("qwen-image") / "transformer", 3, doorbells, reports=1)
    for eager, compiled in zip(outputs["eager"], outputs["compiled"]):
        np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-5)
    assert total.graphs >= 1 and total.graph_breaks == 0, total
    assert later.graphs == 0, later
