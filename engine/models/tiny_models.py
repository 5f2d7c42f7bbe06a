"""Builds the tiny, randomly initialised pipelines of the model zoo, offline and deterministically.

The result is an ordinary diffusers checkpoint folder (model_index.json, safetensors, tokenizer
files) that `DiffusionPipeline.from_pretrained` loads. Component sizes come from `configs/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from configs import FamilyConfig, load_family
from engine.models.tiny_tokenizers import build_clip_tokenizer, build_qwen_tokenizer, build_t5_tokenizer
from workers.qwen_vl_processor import Qwen2VLImageOnlyProcessor

TINY_PREFIX = "tiny/"


def _seeded(seed: int, factory: Callable[[], Any]) -> Any:
    torch.manual_seed(seed)
    return factory()


def autoencoder_kl(recipe: dict[str, Any]) -> AutoencoderKL:
    """A small AutoencoderKL (flat single-layer blocks) of the shape `recipe` sets."""
    depth = len(recipe["block_out_channels"])
    defaults = {"layers_per_block": 1, "norm_num_groups": 8, "use_quant_conv": False, "use_post_quant_conv": False}
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * depth,
        up_block_types=["UpDecoderBlock2D"] * depth,
        **{**defaults, **recipe},
    )


def build_transformer(class_name: str, config: dict[str, Any]) -> torch.nn.Module:
    """A freshly initialised diffusers DiT of class `class_name`."""
    model = getattr(diffusers, class_name)(**config)
    # Z-Image allocates its padding tokens with torch.empty; give them defined values.
    for name in ("x_pad_token", "cap_pad_token"):
        token = getattr(model, name, None)
        if isinstance(token, torch.nn.Parameter):
            torch.nn.init.normal_(token, std=0.02)
    return model


def _clip_text_encoder(recipe: dict[str, Any], tokenizer) -> transformers.CLIPTextModelWithProjection:
    config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
        **recipe,
    )
    return transformers.CLIPTextModelWithProjection(config)


def _t5_text_encoder(recipe: dict[str, Any], tokenizer) -> transformers.T5EncoderModel:
    config = transformers.T5Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        feed_forward_proj="gated-gelu",
        **recipe,
    )
    return transformers.T5EncoderModel(config)


def _z_image_components(family: FamilyConfig) -> dict[str, Any]:
    tiny = family.tiny
    tokenizer = build_qwen_tokenizer(chat_template=True)
    text_config = transformers.Qwen3Config(vocab_size=len(tokenizer), **tiny.component("text_encoder"))
    return {
        "tokenizer": tokenizer,
        "text_encoder": _seeded(tiny.seed + 1, lambda: transformers.Qwen3Model(text_config)),
        "vae": _seeded(tiny.seed + 2, lambda: autoencoder_kl(tiny.component("vae"))),
    }


def _qwen_image_components(family: FamilyConfig) -> dict[str, Any]:
    tiny = family.tiny
    tokenizer = build_qwen_tokenizer()
    text = tiny.component("text_encoder")
    mrope_section = text.pop("mrope_section")
    token_id = tokenizer.convert_tokens_to_ids
    config = transformers.Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": token_id("<|im_end|>"),
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope_section},
            **text,
        },
        vision_config=tiny.component("vision_encoder"),
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )
    components = {
        "tokenizer": tokenizer,
        "text_encoder": _seeded(
            tiny.seed + 1, lambda: transformers.Qwen2_5_VLForConditionalGeneration(config)
        ),
        "vae": _seeded(tiny.seed + 2, lambda: AutoencoderKLQwenImage(**tiny.component("vae"))),
    }
    if family.is_edit:
        processor_recipe = tiny.component("processor")
        image_processor = Qwen2VLImageProcessorPil(
            max_pixels=processor_recipe["max_pixels"], min_pixels=min(3136, processor_recipe["max_pixels"])
        )
        components["processor"] = Qwen2VLImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return components


def _flux_components(family: FamilyConfig) -> dict[str, Any]:
    tiny = family.tiny
    clip_tokenizer, t5_tokenizer = build_clip_tokenizer(), build_t5_tokenizer()
    return {
        "tokenizer": clip_tokenizer,
        "text_encoder": _seeded(
            tiny.seed + 1,
            lambda: transformers.CLIPTextModel(
                _clip_text_encoder(tiny.component("clip_text_encoder"), clip_tokenizer).config
            ),
        ),
        "tokenizer_2": t5_tokenizer,
        "text_encoder_2": _seeded(
            tiny.seed + 2, lambda: _t5_text_encoder(tiny.component("t5_text_encoder"), t5_tokenizer)
        ),
        "vae": _seeded(tiny.seed + 3, lambda: autoencoder_kl(tiny.component("vae"))),
    }


def _sd3_components(family: FamilyConfig) -> dict[str, Any]:
    tiny = family.tiny
    clip = tiny.component("clip_text_encoder")
    t5_tokenizer = build_t5_tokenizer()
    return {
        "tokenizer": build_clip_tokenizer(),
        "text_encoder": _seeded(tiny.seed + 1, lambda: _clip_text_encoder(clip, build_clip_tokenizer())),
        "tokenizer_2": build_clip_tokenizer(),
        "text_encoder_2": _seeded(tiny.seed + 2, lambda: _clip_text_encoder(clip, build_clip_tokenizer())),
        "tokenizer_3": t5_tokenizer,
        "text_encoder_3": _seeded(
            tiny.seed + 3, lambda: _t5_text_encoder(tiny.component("t5_text_encoder"), t5_tokenizer)
        ),
        "vae": _seeded(tiny.seed + 4, lambda: autoencoder_kl(tiny.component("vae"))),
    }


_COMPONENT_BUILDERS: dict[str, Callable[[FamilyConfig], dict[str, Any]]] = {
    "z-image": _z_image_components,
    "qwen-image": _qwen_image_components,
    "qwen-image-edit": _qwen_image_components,
    "qwen-image-edit-plus": _qwen_image_components,
    "flux": _flux_components,
    "sd3": _sd3_components,
}


def tiny_model_names() -> list[str]:
    return [TINY_PREFIX + name for name in _COMPONENT_BUILDERS]


def build_tiny_pipeline(family_name: str) -> diffusers.DiffusionPipeline:
    family = load_family(family_name)
    components = _COMPONENT_BUILDERS[family_name](family)
    components["transformer"] = _seeded(
        family.tiny.seed, lambda: build_transformer(family.transformer_class, family.tiny.transformer)
    )
    components["scheduler"] = FlowMatchEulerDiscreteScheduler(**family.tiny.component("scheduler"))
    return getattr(diffusers, family.pipeline_class)(**components)


def tiny_text_tools(family_name: str) -> dict[str, Any]:
    """The family's tokenizers (and processor) as the tiny models have them: byte-level, no files.
    `--load-format dummy` uses them with full-size random models (every id is a valid token)."""
    components = _COMPONENT_BUILDERS[family_name](load_family(family_name))
    return {name: value for name, value in components.items() if not isinstance(value, torch.nn.Module)}


def save_text_tools(tools: dict[str, Any], directory: Path) -> dict[str, list[str]]:
    """Save tokenizers and processor under `directory`; their model_index.json entries."""
    entries = {}
    for name, tool in tools.items():
        tool.save_pretrained(directory / name)
        entries[name] = ["transformers", type(tool).__name__]
        if isinstance(tool, Qwen2VLImageOnlyProcessor):
            # Record the stock class name so the folder is an ordinary Qwen-Image-Edit checkpoint.
            entries[name] = ["transformers", "Qwen2VLProcessor"]
            _rewrite_json(directory / name / "processor_config.json", processor_class="Qwen2VLProcessor")
    return entries


def write_tiny_model(family_name: str, directory: str | Path) -> Path:
    """Write the tiny `family_name` pipeline to `directory` as a diffusers checkpoint."""
    if family_name not in _COMPONENT_BUILDERS:
        raise ValueError(
            f"no tiny model named {family_name!r}; available: {', '.join(tiny_model_names())}"
        )
    directory = Path(directory)
    pipeline = build_tiny_pipeline(family_name)
    pipeline.save_pretrained(directory, safe_serialization=True)
    if "processor" in pipeline.components:
        # Record the stock class name so the folder is an ordinary Qwen-Image-Edit checkpoint.
        _rewrite_json(directory / "model_index.json", processor=["transformers", "Qwen2VLProcessor"])
        _rewrite_json(directory / "processor" / "processor_config.json", processor_class="Qwen2VLProcessor")
    return directory


def _rewrite_json(path: Path, **updates: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **updates}, indent=2))


def cache_root() -> Path:
    return Path(os.environ.get("DITSERVE_CACHE", Path.home() / ".cache" / "ditserve"))


def cached_folder(target: Path, write: Callable[[Path], Any]) -> Path:
    """`target`, written by `write(folder)` on first use.

    The folder is written beside its final place and renamed, so concurrent first uses never
    see a half-written one.
    """
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def cached_tiny_model(name: str) -> Path:
    """The folder of tiny model `name` ("tiny/flux"), built on first use. The folder name carries a
    fingerprint of the family's tiny recipe, so a changed recipe never reuses an old build."""
    family_name = name.removeprefix(TINY_PREFIX)
    recipe = json.dumps(load_family(family_name).tiny.model_dump(mode="json"), sort_keys=True)
    fingerprint = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    target = cache_root() / "tiny" / f"{family_name}-{fingerprint}"
    return cached_folder(target, lambda folder: write_tiny_model(family_name, folder))
