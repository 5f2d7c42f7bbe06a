"""Real published shapes in the real checkpoint layout: SD3.5-large's DiT (38 heads: uneven at TP=4)
and the bigG CLIP encoder, cut to two blocks and one layer, random weights in bf16, each split over several
safetensors files with an index (layers straddle files). Shards load at TP=2 and TP=4, hold the
bytes the memory report predicts, and compute what the unsharded model computes."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
import transformers

from configs import load_family, load_published_models
from tests.helpers import run_ranks
from workers import RankLayout
from workers.parallel import parallel_state
from workers.parallel.sharded_loading import ShardedComponent, load_component_shard, sharded_components

SHORTENED = {  # every width, head count and table as published
    "transformer": {"num_layers": 2},  # the last block differs (context_pre_only): two are the fewest
    "text_encoder_2": {"num_hidden_layers": 1},
}
TOLERANCE = 2e-4  # fp32 compute; relative to the output's scale (about 1)


@pytest.fixture(scope="module")
def shortened_sd35_large(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd35-large-shortened")
    entry = load_published_models()["stabilityai/stable-diffusion-3.5-large"]
    for name, overrides in SHORTENED.items():
        library, class_name, config = entry[name]
        torch.manual_seed(0)
        if library == "diffusers":
            model = getattr(diffusers, class_name).from_config({**config, **overrides})
        else:
            model = getattr(transformers, class_name)(
                getattr(transformers, class_name).config_class(**{**config, **overrides}))
        model.to(torch.bfloat16).save_pretrained(root / name, max_shard_size="20MB")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline",
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    }))
    return root


@pytest.fixture(scope="module")
def unsharded_outputs(shortened_sd35_large) -> dict[str, torch.Tensor]:
    """What the whole (unsharded) components compute, in fp32."""
    root = shortened_sd35_large
    models = {
        "transformer": diffusers.SD3Transformer2DModel.from_pretrained(root / "transformer", torch_dtype=torch.float32),
        "text_encoder_2": transformers.CLIPTextModelWithProjection.from_pretrained(
            root / "text_encoder_2", dtype=torch.float32),
    }
    with torch.inference_mode():
        return {name: output(name, model(**inputs()[name])) for name, model in models.items()}


def components(root) -> list[ShardedComponent]:
    return sharded_components(load_family("sd3"), root)


def inputs() -> dict:
    generator = torch.Generator().manual_seed(1)
    return {
        "transformer": dict(
            hidden_states=torch.randn(1, 16, 16, 16, generator=generator),
            encoder_hidden_states=torch.randn(1, 8, 4096, generator=generator),
            pooled_projections=torch.randn(1, 2048, generator=generator),
            timestep=torch.tensor([500.0]),
        ),
        "text_encoder_2": dict(input_ids=torch.tensor([[49406, 320, 2368, 530, 49407]])),
    }


def output(name: str, result) -> torch.Tensor:
    return result.sample if name == "transformer" else result.text_embeds


def load_and_run(rank: int, world_size: int, port: int, root, results) -> None:
    torch.set_num_threads(1)
    parallel_state.initialize(rank, RankLayout(tensor_parallel_size=world_size), "cpu", port)
    outputs, held = {}, {}
    for component in components(root):
        shard = load_component_shard(component, root / component.name, rank, world_size, torch.device("cpu"),
                                     torch.float32)
        held[component.name] = sum(t.nbytes for t in (*shard.parameters(), *shard.buffers()))
        with torch.inference_mode():
            outputs[component.name] = output(component.name, shard(**inputs()[component.name])).numpy().copy()
    results.put((rank, outputs, held))
    parallel_state.shutdown()


def test_the_checkpoint_is_in_the_real_multi_file_layout(shortened_sd35_large):
    for name, index_name in (("transformer", "diffusion_pytorch_model.safetensors.index.json"),
                             ("text_encoder_2", "model.safetensors.index.json")):
        weight_map = json.loads((shortened_sd35_large / name / index_name).read_text())["weight_map"]
        files_per_layer: dict[str, set] = {}
        for key, file in weight_map.items():
            files_per_layer.setdefault(key.rsplit(".", 2)[0], set()).add(file)
        assert len(set(weight_map.values())) >= 3, name
        assert any(len(files) > 1 for files in files_per_layer.values()), f"{name}: no layer straddles two files"


@pytest.mark.parametrize("world_size", [4])  # the most shards (TP=2: the tiny models of every family)
def test_shards_load_hold_the_reported_bytes_and_compute_the_unsharded_output(shortened_sd35_large, unsharded_outputs,
                                                                             world_size):
    from engine.memory_report import memory_report
    from engine.models.resolver import ResolvedModel

    root = shortened_sd35_large
    family = load_family("sd3")
    expected = unsharded_outputs
    received = run_ranks(load_and_run, world_size, root)
    report = memory_report(ResolvedModel("shortened", root, family, family.defaults), world_size, torch.float32)
    for (rank, outputs, held), predicted in zip(received, report):
        assert held["transformer"] == predicted.dit and held["text_encoder_2"] == predicted.text_encoders
        for name, want in expected.items():
            got = torch.from_numpy(outputs[name])
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCE * float(want.abs().max()), msg=name)
    loaded_dit = [held["transformer"] for _, _, held in received]
    loaded_total = [sum(held.values()) for _, _, held in received]
    assert max(loaded_dit) <= 1.10 * sum(loaded_dit) / world_size + 64 * 2**20
    assert max(loaded_total) <= 1.15 * sum(loaded_total) / world_size + 0.5 * 2**30
    dit = [r.dit_sharded for r in report]
    if world_size == 4:
        assert dit[0] == dit[1] > dit[2] == dit[3]  # 38 heads: 10/10/9/9
    else:
        assert dit[0] == dit[1]  # 19/19
