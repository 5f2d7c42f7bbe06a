"""The TP plan: even splits, exact error wording, and per-rank shards that add up to the model."""

from __future__ import annotations

import json

import pytest
import torch

from configs import load_family
from engine import resolve_model
from engine.memory_report import memory_report
from tests.helpers import FAMILIES
from workers.parallel.parallel_linear import ColumnParallelLinear, RowParallelLinear, shard_slices
from workers.parallel.sharded_loading import build_meta_component, dit_component, load_component_shard
from workers.parallel.tensor_parallel import apply_plan, even_partition, head_shares


def test_even_partition_gives_larger_parts_first():
    assert even_partition(30, 4, "heads") == [(0, 8), (8, 16), (16, 23), (23, 30)]
    assert even_partition(10240, 4, "ffn") == [(0, 2560), (2560, 5120), (5120, 7680), (7680, 10240)]


def test_impossible_split_names_dimension_size_request_and_what_works():
    with pytest.raises(ValueError) as error:
        even_partition(6, 8, "n_heads (attention heads)")
    assert str(error.value) == (
        "cannot split n_heads (attention heads)=6 over tensor_parallel_size=8: every rank needs at "
        "least one; tensor-parallel sizes that work: 1 to 6"
    )


@pytest.mark.parametrize("family", [f for f in FAMILIES if not f.startswith("qwen-image-edit")])
def test_every_planned_layer_is_replaced_and_attention_heads_become_local(family, tiny_dir):
    config = load_family(family)
    model = build_meta_component("diffusers", config.transformer_class, tiny_dir(family) / "transformer")
    heads = model.config[config.tensor_parallel.layouts["main"].heads]
    apply_plan(model, config.tensor_parallel, rank=1, world_size=2)
    attention = [m for m in model.modules() if hasattr(m, "heads") and hasattr(m, "to_q")]
    assert attention and {m.heads for m in attention} == {heads // 2}
    for module in attention:
        assert isinstance(module.to_q, ColumnParallelLinear)
        assert shard_slices(module.to_q.weight).ranges == [(module.to_q.out_features, 2 * module.to_q.out_features)]
    rows = [m for m in model.modules() if isinstance(m, RowParallelLinear)]
    assert len(rows) >= len(attention)


@pytest.mark.parametrize("family", [f for f in FAMILIES if not f.startswith("qwen-image-edit")])
def test_rank_shards_hold_at_most_half_the_sharded_part_at_tp2(family, tiny_dir):
    config = load_family(family)
    path = tiny_dir(family) / "transformer"
    full = build_meta_component("diffusers", config.transformer_class, path)
    apply_plan(full, config.tensor_parallel, rank=0, world_size=1)
    sharded_total = sum(p.numel() for p in full.parameters() if shard_slices(p))
    everything = sum(p.numel() for p in full.parameters())
    replicated = everything - sharded_total
    shard_sizes = []
    for rank in range(2):
        shard = load_component_shard(dit_component(config), path, rank, 2, torch.device("cpu"), torch.float32)
        shard_sizes.append(sum(p.numel() for p in shard.parameters()))
        assert shard_sizes[-1] <= 0.5 * sharded_total + replicated
    assert sum(shard_sizes) == sharded_total + 2 * replicated


def test_memory_report_for_a_full_size_config_without_weights(tmp_path):
    """The real Z-Image-Turbo DiT (its config is the class defaults): 30 heads over 4 ranks, 8/8/7/7."""
    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "ZImagePipeline", "transformer": ["diffusers", "ZImageTransformer2DModel"]}))
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "ZImageTransformer2DModel"}))
    ranks = memory_report(resolve_model(str(tmp_path)), 4, torch.bfloat16)
    total_dit = sum(r.dit_sharded for r in ranks) + ranks[0].dit_replicated
    assert 11e9 < total_dit < 13.5e9  # ~6.15B parameters in bf16
    assert ranks[0].dit_sharded == ranks[1].dit_sharded > ranks[2].dit_sharded == ranks[3].dit_sharded
    assert len({r.dit_replicated for r in ranks}) == 1
    assert all(r.text_encoders == r.vae == 0 for r in ranks[1:])


def test_gqa_heads_split_by_kv_head_and_kv_heads_are_shared_when_ranks_outnumber_them():
    # Qwen3-4B (Z-Image's encoder): 32 query heads over 8 KV heads at TP=3: KV 3/3/2, queries 12/12/8
    assert [(s.heads, s.kv_heads) for s in head_shares(32, 8, 128, 3, "heads")] == [
        ((0, 12), (0, 3)), ((12, 24), (3, 6)), ((24, 32), (6, 8))]
    # Qwen2.5-VL-7B: 28 query heads over 4 KV heads at TP=8: two ranks per KV head, 4 + 3 queries each
    shares = head_shares(28, 4, 128, 8, "heads")
    assert [s.kv_heads for s in shares] == [(k, k + 1) for k in range(4) for _ in range(2)]
    assert [s.local_heads for s in shares] == [4, 3] * 4 and shares[1].heads == (4, 7)


def test_a_text_encoder_that_cannot_split_over_all_ranks_takes_the_largest_sub_group_that_works(tiny_dir):
    """No layout is refused for a text encoder's sake: at TP=3 tiny/qwen-image's encoder (4 query
    heads over 2 KV heads) is sharded over ranks 0-1; the check passes and the reason is kept."""
    from engine.parallel_config import DiffusionParallelConfig, check_split
    from workers.planning import describe_split, text_encoder_splits

    model = resolve_model("tiny/qwen-image")
    check_split(model, DiffusionParallelConfig(tensor_parallel_size=3))
    (split,) = text_encoder_splits(model.family, model.path, 3)
    assert (split.name, split.size) == ("text_encoder", 2)
    assert describe_split(split, 3) == (
        "text_encoder (Qwen2_5_VLForConditionalGeneration): sharded over TP ranks 0-1 of 3; cannot split "
        "text_config.num_attention_heads: 4 query heads over 2 KV heads at tensor_parallel_size=3; "
        "tensor-parallel sizes that work: 1, 2, 4")
