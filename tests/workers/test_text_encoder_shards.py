"""Sharded text encoders (real rank processes over gloo) give the unsharded prompt embeddings."""

from __future__ import annotations

import pytest
import torch
import transformers

from configs import load_family
from engine.models.tiny_models import cached_tiny_model
from tests.helpers import run_ranks
from workers import RankLayout
from workers.parallel import parallel_state
from workers.parallel.sharded_loading import sharded_components

ENCODERS = [("z-image", "text_encoder"), ("qwen-image", "text_encoder"), ("flux", "text_encoder"),
            ("flux", "text_encoder_2"), ("sd3", "text_encoder"), ("sd3", "text_encoder_2"), ("sd3", "text_encoder_3")]
TOLERANCE = 1e-5  # fp32; the sharded sums differ from the whole ones only in rounding order (~1e-6 seen)


def component(family: str, name: str):
    path = cached_tiny_model(f"tiny/{family}")
    return path, next(c for c in sharded_components(load_family(family), path) if c.name == name)


def embeddings(model) -> torch.Tensor:
    ids = torch.tensor([[5, 17, 33, 2, 9, 41, 7, 3]])
    with torch.inference_mode():
        output = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    return output.hidden_states[-1]


def shard_and_embed(rank: int, world_size: int, port: int, results) -> None:
    from workers.parallel.sharded_loading import load_component_shard

    torch.set_num_threads(1)
    parallel_state.initialize(rank, RankLayout(tensor_parallel_size=world_size), "cpu", port)
    outputs = []
    for family, name in ENCODERS:
        path, part = component(family, name)
        shard = load_component_shard(part, path / name, rank, world_size, torch.device("cpu"), torch.float32)
        outputs.append(embeddings(shard).numpy().copy())
    results.put((rank, outputs))
    parallel_state.shutdown()


@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_text_encoders_give_the_unsharded_embeddings(tiny_dir, world_size):
    expected = []
    for family, name in ENCODERS:
        path, part = component(family, name)
        expected.append(embeddings(getattr(transformers, part.class_name).from_pretrained(path / name)))
    outputs = run_ranks(shard_and_embed, world_size)[0][1]  # rank 0's
    for (family, name), got, want in zip(ENCODERS, outputs, expected):
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=0, atol=TOLERANCE, msg=f"{family} {name}")
