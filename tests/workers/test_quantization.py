"""Quantized weights: GGUF blocks decode as gguf-py's reference does, FP8 / int8 round-trips are
bounded, GGUF splits keep blocks whole (moved and reported, or refused naming what works), and
real loads of shortened full-shape DiTs hold the bytes TP and quantization promise."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as reference_dequantize

from configs import load_family
from engine import resolve_model
from engine.models.published_models import cached_published_configs
from workers.messages import RankLayout
from workers.parallel.sharded_loading import dit_component, load_component_shard
from workers.planning import check_tensor_split, fewest_dit_heads, rank_memory, vae_decode_peaks
from workers.quantization import gguf_blocks
from workers.quantization.gguf_files import write_model_gguf
from workers.quantization.schemes import Quantization
from workers.quantization.weights import quantize

SCALE_OFFSETS = {T.Q8_0: [0], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}


@pytest.mark.parametrize("kind", [T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K])
def test_block_formats_decode_as_gguf_py_does(kind):
    """Random blocks (their float16 factors set to finite values) decode bit-for-bit alike."""
    form = gguf_blocks.block_format(kind)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(5, 3 * form.nbytes), dtype=np.uint8)
    blocks = raw.reshape(-1, form.nbytes)
    for offset in SCALE_OFFSETS[kind]:
        factors = rng.uniform(-2, 2, size=len(blocks)).astype(np.float16)
        blocks[:, offset:offset + 2] = factors.view(np.uint8).reshape(-1, 2)
    ours = gguf_blocks.dequantize(torch.from_numpy(raw), kind, torch.float32).numpy()
    np.testing.assert_array_equal(ours, reference_dequantize(raw, kind))


@pytest.mark.parametrize(("kind", "mean_error"), [(T.Q8_0, 0.006), (T.Q4_K, 0.08)])
def test_encoded_blocks_decode_close_to_the_weights(kind, mean_error):
    weight = torch.randn(8, 512, generator=torch.Generator().manual_seed(0))
    encoded = gguf_blocks.quantize(weight, kind)
    decoded = torch.from_numpy(reference_dequantize(encoded.numpy(), kind))
    assert decoded.shape == weight.shape
    assert (decoded - weight).abs().mean() < mean_error


@pytest.mark.parametrize(("method", "steps"), [("fp8", 16), ("int8", 127)])
def test_per_channel_quantizing_is_bounded_by_each_rows_own_scale(method, steps):
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 1, 16)[:, None]
    values, scale = quantize(weight, method)
    assert values.dtype == (torch.float8_e4m3fn if method == "fp8" else torch.int8) and scale.shape == (16,)
    error = (values.float() * scale[:, None] - weight).abs().amax(dim=1)
    row_max = weight.abs().amax(dim=1)
    assert torch.all(error <= row_max / steps), "each row's error is within its own format step"


@pytest.fixture(scope="module")
def q8_z_image(tmp_path_factory, tiny_dir):
    """tiny/z-image with its DiT in a Q8_0 GGUF file: heads of 16 columns, so a 32-column block
    spans two heads and 6 heads split in units of two."""
    import diffusers

    folder = shutil.copytree(tiny_dir("z-image"), tmp_path_factory.mktemp("q8") / "z-image")
    dit = diffusers.ZImageTransformer2DModel.from_pretrained(folder / "transformer")
    write_model_gguf(dit, folder / "transformer" / "model.gguf", T.Q8_0)
    return resolve_model(str(folder))


def test_a_split_that_would_cut_blocks_moves_to_their_boundaries_and_is_reported(q8_z_image):
    ranks = rank_memory(q8_z_image.family, q8_z_image.path, RankLayout(tensor_parallel_size=2), torch.float32,
                        quantization="gguf")
    moved = ranks[0].moved_splits
    assert any("n_heads=6 heads split 4/2 over the TP ranks to keep" in line and "Q8_0 blocks of 32 columns" in line
               for line in moved), moved
    assert ranks[0].dit_sharded > ranks[1].dit_sharded  # rank 0 holds four heads, rank 1 two
    # Ulysses splits a rank's heads: the check sees the moved split (two heads on rank 1, not three)
    assert fewest_dit_heads(q8_z_image.family, q8_z_image.path, 2) == 3
    assert fewest_dit_heads(q8_z_image.family, q8_z_image.path, 2, "gguf") == 2


def test_a_split_that_cannot_keep_blocks_whole_names_the_layer_and_the_sizes_that_work(q8_z_image):
    with pytest.raises(ValueError) as error:
        check_tensor_split(q8_z_image.family, q8_z_image.path, 4, "gguf")
    message = str(error.value)
    assert "cannot split n_heads (attention heads)=6 over tensor_parallel_size=4" in message
    assert "attention.to_out.0's Q8_0 blocks of 32 columns stay whole" in message
    assert message.endswith("tensor-parallel sizes that work: 1 to 3")


def _shortened(tmp_path, hub_id: str, **layers) -> tuple:
    """A published DiT's configuration with fewer blocks: full-width layers, a small file."""
    source = cached_published_configs(hub_id) / "transformer" / "config.json"
    target = tmp_path / hub_id.replace("/", "--") / "transformer"
    target.mkdir(parents=True)
    (target / "config.json").write_text(json.dumps({**json.loads(source.read_text()), **layers}))
    return load_family(resolve_model(hub_id, configs_only=True).family.name), target


def _dit_bytes(family, directory, rank: int, world_size: int, quantization: str | None) -> int:
    dit = load_component_shard(dit_component(family), directory, rank, world_size, torch.device("cpu"),
                               torch.bfloat16, dummy=True,
                               quantization=Quantization.parse(quantization, family.quantization))
    return sum(t.nbytes for t in (*dit.parameters(), *dit.buffers()))


@pytest.mark.parametrize(("hub_id", "layers"), [
    ("Qwen/Qwen-Image", {"num_layers": 1}),
    ("black-forest-labs/FLUX.1-dev", {"num_layers": 1, "num_single_layers": 1}),
])
def test_real_loads_of_full_width_dits_hold_the_promised_bytes(tmp_path, hub_id, layers):
    """fp8 / int8 at TP=2: <= 0.55x of their TP=1 bytes and <= 0.30x of bf16 at TP=1 (dummy loads:
    the real load path with random weights, one or two blocks at full width)."""
    family, directory = _shortened(tmp_path, hub_id, **layers)
    bf16 = _dit_bytes(family, directory, 0, 1, None)
    for method in ("fp8", "int8"):
        whole, shard = _dit_bytes(family, directory, 0, 1, method), _dit_bytes(family, directory, 0, 2, method)
        assert shard <= 0.55 * whole, (method, shard / whole)
        assert shard <= 0.30 * bf16, (method, shard / bf16)


def test_memory_report_shows_qwen_image_at_tp6_with_its_text_encoder_on_four_ranks():
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "memory", "Qwen/Qwen-Image", "-tp", "6", "--quantization", "fp8"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "Qwen/Qwen-Image (qwen-image), tensor_parallel_size=6, bfloat16 parameters, fp8 weights"
    rows = [line.split() for line in lines[2:8]]
    dit = [float(row[1]) for row in rows]
    assert max(dit) - min(dit) < 0.01 and 3.0 < dit[0] < 3.4  # ~20.4 GB of fp8 DiT over 6 ranks, in GiB
    encoder = [row[5:7] for row in rows]
    assert encoder[:4] == [encoder[0]] * 4 and encoder[0][1] == "GiB" and encoder[4] == encoder[5] == ["0.00", "MiB"]
    assert any(line.startswith("note: text_encoder (Qwen2_5_VLForConditionalGeneration): sharded over TP ranks 0-3 "
                               "of 6; cannot split text_config.num_attention_heads: 28 query heads over 4 KV heads")
               for line in lines)


def test_tiled_decoding_bounds_the_vae_peak_at_2048():
    peaks = vae_decode_peaks(cached_published_configs("black-forest-labs/FLUX.1-dev"), 2048, 2048, torch.bfloat16)
    image_bytes = 2048 * 2048 * 128 * 2  # one full-resolution activation of the decoder's last stage
    assert peaks["whole"] >= 3 * image_bytes  # several are alive at once
    assert peaks["tiled"] <= peaks["whole"] / 3


def test_a_text_encoder_listed_in_the_plan_is_quantized_too(tiny_dir):
    """`quantization.components` is data: with the text encoder listed, its linear layers hold int8
    (1 byte per weight) and its hidden states stay close to the float encoder's."""
    from workers.parallel.sharded_loading import sharded_components
    from workers.quantization.weights import QuantizedWeight

    family = load_family("z-image")
    component = sharded_components(family, tiny_dir("z-image"))[1]
    directory = tiny_dir("z-image") / component.name
    asked = Quantization("int8", components=("transformer", "text_encoder"))
    plain, quantized = (load_component_shard(component, directory, 0, 1, torch.device("cpu"), torch.float32,
                                             quantization=q) for q in (None, asked))
    weights = [m for m in quantized.modules() if isinstance(m, QuantizedWeight)]
    assert weights and all(w.values.dtype == torch.int8 for w in weights)
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    expected, got = plain(input_ids=ids).last_hidden_state, quantized(input_ids=ids).last_hidden_state
    assert (got - expected).norm() < 0.05 * expected.norm()


@pytest.mark.parametrize("kind", [T.F32, T.F16, T.BF16])
def test_plain_gguf_tensors_read_as_column_slices(tmp_path, kind):
    from workers.quantization.gguf_files import GgufCheckpoint, write_gguf
    from workers.shard_slices import ShardSlices

    weight = torch.randn(3, 8)
    checkpoint = GgufCheckpoint(write_gguf(tmp_path / "plain.gguf", {"a.weight": weight}, lambda name, t: kind))
    stored = weight.to(gguf_blocks.PLAIN[kind])
    assert torch.equal(checkpoint.read("a.weight", None), stored)
    assert torch.equal(checkpoint.read("a.weight", ShardSlices(1, [(0, 2), (5, 8)])), stored[:, [0, 1, 5, 6, 7]])


def _flux_original_shapes() -> dict[str, tuple[int, ...]]:
    """FLUX.1's own checkpoint layout (Black Forest Labs' names, as ComfyUI's and city96's GGUF
    files keep them) for one double and one single block at full width."""
    d, mlp, head, shapes = 3072, 12288, 128, {}
    for name, (rows, columns) in {"img_in": (d, 64), "txt_in": (d, 4096), "time_in.in_layer": (d, 256),
                                  "time_in.out_layer": (d, d), "vector_in.in_layer": (d, 768),
                                  "vector_in.out_layer": (d, d), "guidance_in.in_layer": (d, 256),
                                  "guidance_in.out_layer": (d, d), "final_layer.linear": (64, d),
                                  "final_layer.adaLN_modulation.1": (2 * d, d),
                                  "single_blocks.0.linear1": (3 * d + mlp, d), "single_blocks.0.linear2": (d, d + mlp),
                                  "single_blocks.0.modulation.lin": (3 * d, d)}.items():
        shapes.update({f"{name}.weight": (rows, columns), f"{name}.bias": (rows,)})
    for stream in ("img", "txt"):
        block = f"double_blocks.0.{stream}"
        for name, (rows, columns) in {"mod.lin": (6 * d, d), "attn.qkv": (3 * d, d), "attn.proj": (d, d),
                                      "mlp.0": (mlp, d), "mlp.2": (d, mlp)}.items():
            shapes.update({f"{block}_{name}.weight": (rows, columns), f"{block}_{name}.bias": (rows,)})
        shapes.update({f"{block}_attn.norm.{n}.scale": (head,) for n in ("query_norm", "key_norm")})
    shapes.update({f"single_blocks.0.norm.{n}.scale": (head,) for n in ("query_norm", "key_norm")})
    return shapes


def test_flux_original_names_map_onto_every_diffusers_tensor_as_rows():
    """diffusers' FLUX converter, run on row placeholders: every tensor of the diffusers model is
    covered with its shape, fused q/k/v and single-block projections are row ranges, and the final
    modulation's shift and scale halves are swapped (so reading takes rows, never decodes)."""
    import diffusers

    from workers.quantization.original_names import diffusers_layout

    layout = diffusers_layout("FluxTransformer2DModel", _flux_original_shapes())
    config = json.loads((cached_published_configs("black-forest-labs/FLUX.1-dev") / "transformer" /
                         "config.json").read_text())
    with torch.device("meta"):
        model = diffusers.FluxTransformer2DModel.from_config({**config, "num_layers": 1, "num_single_layers": 1})
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert {name: tuple(layout[name].shape) for name in expected} == expected
    d = 3072
    assert layout["transformer_blocks.0.attn.to_k.weight"].parts == (("double_blocks.0.img_attn.qkv.weight", d, 2 * d),)
    mlp_bias = layout["single_transformer_blocks.0.proj_mlp.bias"]
    assert mlp_bias.parts == (("single_blocks.0.linear1.bias", 3 * d, 7 * d),)
    assert layout["norm_out.linear.weight"].parts == (("final_layer.adaLN_modulation.1.weight", d, 2 * d),
                                                      ("final_layer.adaLN_modulation.1.weight", 0, d))
    assert layout["norm_out.linear.weight"].rows(d - 2, d + 2).parts == (
        ("final_layer.adaLN_modulation.1.weight", 2 * d - 2, 2 * d), ("final_layer.adaLN_modulation.1.weight", 0, 2))


@pytest.mark.parametrize("per_channel", [True, False])
def test_the_scaled_fp8_matmul_rounds_activations_per_row_alike_in_every_layout(per_channel):
    """The FP8-GPU path (torch._scaled_mm, which this torch also runs on CPU): activations quantized
    per row with that row's max, so the result is the float product of both rounded operands; a
    row-parallel split whose ranks share each row's max over all columns sums to the same result."""
    from workers.quantization.weights import FP8, FP8_MAX, QuantizedWeight, _scaled_fp8_linear

    generator = torch.Generator().manual_seed(4)
    weight, x = torch.randn(32, 64, generator=generator), torch.randn(2, 5, 64, generator=generator).bfloat16()

    def fp8_weight(columns: slice) -> QuantizedWeight:
        stored = QuantizedWeight("fp8", (32, columns.stop - columns.start), torch.bfloat16, per_channel=per_channel,
                                 device="cpu")
        values, scale = quantize(weight, "fp8")
        if not per_channel:
            scale = weight.abs().amax() / FP8_MAX
            values = (weight / scale).to(FP8)
        stored.values, stored.scale = values[:, columns].contiguous(), scale
        return stored

    whole = _scaled_fp8_linear(x, fp8_weight(slice(0, 64)), None, None)
    row_max = x.float().abs().amax(dim=-1, keepdim=True) / FP8_MAX
    rounded = (x.float() / row_max).to(FP8).float() * row_max
    expected = rounded @ fp8_weight(slice(0, 64)).dequantize(torch.float32).T
    assert whole.shape == (2, 5, 32) and whole.dtype == torch.bfloat16
    torch.testing.assert_close(whole.float(), expected, rtol=2e-2, atol=2e-2)
    halves = [slice(0, 24), slice(24, 64)]
    amax = torch.maximum(*(x[..., h].float().abs().amax(dim=-1).reshape(-1, 1) for h in halves))
    partials = [_scaled_fp8_linear(x[..., h], fp8_weight(h), None, lambda local, amax=amax: amax) for h in halves]
    torch.testing.assert_close((partials[0].float() + partials[1].float()), whole.float(), rtol=2e-2, atol=3e-2)
