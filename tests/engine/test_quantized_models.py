"""Quantized checkpoints through the real engine: each format's image at TP=1 equals plain diffusers
run on the dequantized weights (max pixel difference <= 1, fp32 compute), and TP=N equals TP=1.

The references decode the checkpoints independently of the server: gguf-py's own numpy decoder for
GGUF files, values x scales for FP8, and the per-row int8 rule written out here for int8."""

from __future__ import annotations

import fnmatch
import multiprocessing
import shutil
from pathlib import Path

import diffusers
import pytest
import torch
from gguf import GGMLQuantizationType as T
from safetensors.torch import load_file, save_file

from configs import load_family
from engine import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams, WorkerStartupError
from engine.models.tiny_models import cached_tiny_model
from tests.helpers import REFERENCE_PROMPT, REFERENCE_SEED, REFERENCE_STEPS, max_pixel_difference, reference_image
from workers.quantization.gguf_files import dequantized_state_dict, write_model_gguf

PARAMS = OmniDiffusionSamplingParams(num_inference_steps=REFERENCE_STEPS, height=64, width=96, seed=REFERENCE_SEED)
KEEP = load_family("z-image").quantization.keep
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


def _generate(model: Path, quantization: str, tp: int, **options) -> tuple:
    with Omni(model=str(model), quantization=quantization, parallel_config=DiffusionParallelConfig(tp),
              **options) as omni:
        loras = options.get("lora_modules")
        params = PARAMS if not loras else OmniDiffusionSamplingParams(
            **{**PARAMS.__dict__, "loras": [{"name": name, "scale": 1.0} for name in loras]})
        return omni.generate(REFERENCE_PROMPT, params)[0].images[0], omni.rank_parameter_bytes()


def _assert_diffusers_image_at_tp1_and_tp2(model: Path, quantization: str, expected) -> None:
    """TP=1 gives diffusers' image on the decoded weights, TP=2 gives TP=1's (max pixel difference <= 1)."""
    one, _ = _generate(model, quantization, 1)
    assert max_pixel_difference(one, expected) <= 1
    two, _ = _generate(model, quantization, 2)
    assert max_pixel_difference(two, one) <= 1


def _copy_with_weights(source: Path, target: Path, weights: dict[str, torch.Tensor]) -> Path:
    """`source` with its DiT's weights replaced (the reference, or the quantized checkpoint)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.gguf"))
    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, str(target / WEIGHTS))
    return target


def _quantized_linears(folder: Path) -> list[str]:
    dit = diffusers.ZImageTransformer2DModel.from_pretrained(folder / "transformer")
    return [name for name, module in dit.named_modules() if isinstance(module, torch.nn.Linear)
            and not any(fnmatch.fnmatchcase(name, pattern) for pattern in KEEP)]


@pytest.fixture(scope="module")
def wide_z_image(tmp_path_factory):
    """tiny/z-image with a DiT wide enough for Q4_K's 256-column blocks (dim 384, FFN 1024, heads of
    64 columns), written as a GGUF file the way converters do: Q4_K where rows are whole blocks,
    Q8_0 elsewhere. Returns (the folder, the reference folder with gguf-py's decoded weights)."""
    root = tmp_path_factory.mktemp("wide")
    folder = shutil.copytree(cached_tiny_model("z-image"), root / "wide")
    config = diffusers.ZImageTransformer2DModel.load_config(folder / "transformer")
    torch.manual_seed(3)
    dit = diffusers.ZImageTransformer2DModel.from_config({**config, "dim": 384, "axes_dims": [16, 24, 24]})
    for parameter in (dit.x_pad_token, dit.cap_pad_token):
        torch.nn.init.normal_(parameter)
    dit.save_pretrained(folder / "transformer")
    write_model_gguf(dit, folder / "transformer" / "model.gguf", T.Q4_K)
    decoded = dequantized_state_dict(folder / "transformer" / "model.gguf")
    return folder, _copy_with_weights(folder, root / "reference", decoded)


def test_gguf_q4_k_matches_its_decoded_weights_in_diffusers_and_splits_over_two_and_four_ranks(wide_z_image):
    folder, reference_folder = wide_z_image
    reference = reference_image(reference_folder, "z-image", 64, 96)
    one, held_one = _generate(folder, "gguf", 1)
    assert max_pixel_difference(one, reference) <= 1
    for tp in (2, 4):
        image, held = _generate(folder, "gguf", tp)
        assert max_pixel_difference(image, one) <= 1, tp
        share = held[0]["transformer"] / held_one[0]["transformer"]
        assert share < {2: 0.6, 4: 0.35}[tp], (tp, share)  # 1/tp plus the few layers every rank holds


def test_a_split_moved_to_block_boundaries_gives_the_tp1_image(tiny_dir, tmp_path):
    """Q8_0 blocks of 32 columns span two of tiny/z-image's 16-column heads: at TP=2 its six heads
    split 4/2 instead of 3/3 (tests/workers/test_quantization.py checks the report), same image."""
    folder = shutil.copytree(tiny_dir("z-image"), tmp_path / "q8")
    dit = diffusers.ZImageTransformer2DModel.from_pretrained(folder / "transformer")
    write_model_gguf(dit, folder / "transformer" / "model.gguf", T.Q8_0)
    one, _ = _generate(folder, "gguf", 1)
    two, held = _generate(folder, "gguf", 2)
    assert max_pixel_difference(two, one) <= 1
    assert held[0]["transformer"] > held[1]["transformer"]


@pytest.fixture(scope="module")
def fp8_z_image(tmp_path_factory, tiny_dir):
    """tiny/z-image as a published FP8 checkpoint lays one out: float8_e4m3fn weights, half of them
    with per-output-channel `weight_scale` (compressed-tensors), half with one per-tensor
    `scale_weight` (ComfyUI); the input and output layers in float."""
    root = tmp_path_factory.mktemp("fp8")
    source = tiny_dir("z-image")
    weights = load_file(str(source / WEIGHTS))
    stored, decoded = dict(weights), dict(weights)
    for index, name in enumerate(_quantized_linears(source)):
        weight = weights[f"{name}.weight"].float()
        if index % 2:
            scale = weight.abs().amax(dim=1, keepdim=True) / 448
            stored[f"{name}.weight_scale"] = scale
        else:
            scale = weight.abs().amax() / 448
            stored[f"{name}.scale_weight"] = scale
        stored[f"{name}.weight"] = (weight / scale).to(torch.float8_e4m3fn)
        decoded[f"{name}.weight"] = stored[f"{name}.weight"].float() * scale
    return _copy_with_weights(source, root / "fp8", stored), _copy_with_weights(source, root / "reference", decoded)


def test_an_fp8_checkpoint_with_scales_matches_diffusers_and_tp2_tp4_match_tp1(fp8_z_image):
    folder, reference_folder = fp8_z_image
    one, held_one = _generate(folder, "fp8", 1)
    assert max_pixel_difference(one, reference_image(reference_folder, "z-image", 64, 96)) <= 1
    for tp in (2, 4):
        image, held = _generate(folder, "fp8", tp)
        assert max_pixel_difference(image, one) <= 1, tp
        assert held[0]["transformer"] < held_one[0]["transformer"], tp


def test_int8_quantized_at_load_matches_the_per_row_rule_in_diffusers_and_tp2(tiny_dir, tmp_path):
    """A float checkpoint served with int8: each row rounds to steps of its own max / 127."""
    source = tiny_dir("z-image")
    decoded = load_file(str(source / WEIGHTS))
    for name in _quantized_linears(source):
        weight = decoded[f"{name}.weight"]
        step = (weight.abs().amax(dim=1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        decoded[f"{name}.weight"] = (weight / step).round().clamp(-127, 127) * step
    reference = reference_image(_copy_with_weights(source, tmp_path / "reference", decoded), "z-image", 64, 96)
    _assert_diffusers_image_at_tp1_and_tp2(source, "int8", reference)


def test_lora_adapters_apply_on_top_of_quantized_layers(fp8_z_image, adapters):
    """The adapter stays in the compute dtype; at TP=2 on FP8 base layers the image is diffusers'
    with the decoded weights plus the same adapter."""
    folder, reference_folder = fp8_z_image
    path = adapters("z-image")["b"]
    image, _ = _generate(folder, "fp8", 2, lora_modules={"b": str(path)})
    expected = reference_image(reference_folder, "z-image", 64, 96, loras=((path, 1.0),))
    assert max_pixel_difference(image, expected) <= 1
    assert max_pixel_difference(image, reference_image(reference_folder, "z-image", 64, 96)) > 1


def test_a_text_encoder_that_cannot_split_at_tp3_runs_on_two_ranks_and_the_image_is_tp1s():
    """tiny/qwen-image's encoder (4 query heads over 2 KV heads) does not split over 3 ranks: it is
    sharded over ranks 0-1 while the DiT uses all three."""
    params = OmniDiffusionSamplingParams(num_inference_steps=2, height=64, width=64, seed=7)
    images, held = {}, {}
    for tp in (1, 3):
        with Omni(model="tiny/qwen-image", parallel_config=DiffusionParallelConfig(tp)) as omni:
            images[tp] = omni.generate("a red square", params)[0].images[0]
            held[tp] = omni.rank_parameter_bytes()
    assert max_pixel_difference(images[3], images[1]) <= 1
    assert ["text_encoder" in rank for rank in held[3]] == [True, True, False]
    assert all("transformer" in rank for rank in held[3])


def test_bad_quantization_settings_fail_before_any_rank_starts():
    before = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match=r"quantization='fp4' is not one of fp8, int8, gguf"):
        Omni(model="tiny/z-image", quantization="fp4")
    with pytest.raises(ValueError, match="transformer_file is a .gguf file: it needs quantization='gguf'"):
        Omni(model="tiny/z-image", transformer_file="dit.gguf")
    with pytest.raises(ValueError, match=r"none in .*transformer; name one with --transformer-file"):
        Omni(model="tiny/z-image", quantization="gguf")
    with pytest.raises(ValueError, match="GGUF type 'Q3_K' is not supported; supported: Q8_0, Q4_K, Q5_K, Q6_K"):
        Omni(model="tiny/z-image", quantization="gguf:Q3_K", load_format="dummy")
    assert set(multiprocessing.active_children()) == before


def _original_z_image_names(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Z-Image's own checkpoint layout (ComfyUI's files, `model.diffusion_model.` prefix included):
    q/k/v fused into one `qkv`, the output projection `out`, other names for norms and the ends."""
    renames = {"all_final_layer.2-1.": "final_layer.", "all_x_embedder.2-1.": "x_embedder.",
               ".attention.to_out.0.": ".attention.out.", ".attention.norm_k.": ".attention.k_norm.",
               ".attention.norm_q.": ".attention.q_norm."}
    original = {}
    for name, tensor in weights.items():
        if ".attention.to_k.weight" in name or ".attention.to_v.weight" in name:
            continue
        if ".attention.to_q.weight" in name:
            parts = [weights[name.replace("to_q", which)] for which in ("to_q", "to_k", "to_v")]
            name, tensor = name.replace("to_q", "qkv"), torch.cat(parts)
        for new, old in renames.items():
            name = name.replace(new, old)
        original[f"model.diffusion_model.{name}"] = tensor
    return original


def test_a_gguf_file_in_the_original_layout_reads_through_diffusers_converter(tiny_dir, tmp_path):
    """A Z-Image GGUF with its original names and fused q/k/v in Q8_0: each diffusers tensor is read
    as rows of the stored ones (q, k and v rows of the fused blocks, never decoded whole); 2-D
    tensors that load as plain parameters (the pad tokens) are stored in blocks too and decoded at
    load. The image is diffusers' on the decoded weights, and TP=2 gives TP=1's."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    from workers.quantization.gguf_files import write_gguf

    source = tiny_dir("z-image")
    weights = load_file(str(source / WEIGHTS))
    folder = shutil.copytree(source, tmp_path / "original")
    gguf_file = write_gguf(folder / "transformer" / "model.gguf", _original_z_image_names(weights),
                           lambda name, t: T.Q8_0 if t.dim() == 2 and t.shape[1] % 32 == 0 else T.F32)
    decoded = {name.removeprefix("model.diffusion_model."): t for name, t in dequantized_state_dict(gguf_file).items()}
    reference = convert_z_image_transformer_checkpoint_to_diffusers(decoded)
    assert set(reference) == set(weights)
    expected = reference_image(_copy_with_weights(source, tmp_path / "reference", reference), "z-image", 64, 96)
    _assert_diffusers_image_at_tp1_and_tp2(folder, "gguf", expected)


def test_an_fp8_checkpoint_in_the_original_layout_splits_its_fused_rows_and_their_scales(tiny_dir, tmp_path):
    """ComfyUI-style FP8 safetensors in Z-Image's own names: the fused q/k/v weight in float8 with
    one scale per output row (split into q, k and v rows with their weights), the other layers with
    one per-tensor `scale_weight`. The image is diffusers' on the decoded weights."""
    source = tiny_dir("z-image")
    weights = load_file(str(source / WEIGHTS))
    original = _original_z_image_names(weights)
    stored, decoded = dict(original), {}
    for name, tensor in original.items():
        layer = name.removesuffix(".weight")
        if not name.endswith(".weight") or tensor.dim() != 2 or "embedder" in name or "final_layer" in name:
            continue
        per_row = ".qkv." in name
        scale = tensor.abs().amax(dim=1, keepdim=True) / 448 if per_row else tensor.abs().amax() / 448
        stored[name] = (tensor / scale).to(torch.float8_e4m3fn)
        stored[f"{layer}.weight_scale" if per_row else f"{layer}.scale_weight"] = scale
        decoded[name] = stored[name].float() * scale
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    reference = convert_z_image_transformer_checkpoint_to_diffusers(
        {name.removeprefix("model.diffusion_model."): decoded.get(name, t) for name, t in original.items()})
    expected = reference_image(_copy_with_weights(source, tmp_path / "reference", reference), "z-image", 64, 96)
    folder = _copy_with_weights(source, tmp_path / "fp8-original", stored)
    _assert_diffusers_image_at_tp1_and_tp2(folder, "fp8", expected)


def test_an_fp8_checkpoint_served_without_fp8_fails_to_load_saying_so(fp8_z_image):
    folder, _ = fp8_z_image
    with pytest.raises(WorkerStartupError, match="is stored in float8: serve the model with --quantization fp8"):
        Omni(model=str(folder))
