"""The published full-size models as diffusers folders of configuration files only (no weights).

Enough for the memory report and for `--load-format dummy`, which builds each rank's part with
random weights. The numbers live in configs/published.yaml.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import diffusers
import transformers

from configs import family_for_pipeline_class, load_published_models
from engine.models.tiny_models import cache_root, cached_folder, save_text_tools, tiny_text_tools


def published_model_ids() -> list[str]:
    return list(load_published_models())


def write_published_configs(hub_id: str, directory: Path) -> Path:
    """model_index.json plus each component's config file, as the hub repository has them, and
    the tiny models' byte-level tokenizers (the real ones are not carried; any id they produce is
    a valid token of the real vocabularies, which is all random weights need)."""
    entry = load_published_models()[hub_id]
    directory.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": entry["pipeline_class"], "_diffusers_version": diffusers.__version__}
    tools = tiny_text_tools(family_for_pipeline_class(entry["pipeline_class"]).name)
    index.update(save_text_tools(tools, directory))
    for name, value in entry.items():
        if name == "pipeline_class":
            continue
        library, class_name, config = value
        index[name] = [library, class_name]
        (directory / name).mkdir(exist_ok=True)
        if library == "transformers":
            if class_name == "Qwen2_5_VLForConditionalGeneration":  # vision tokens as the tokenizer numbers them
                config = {**config, **_vision_token_ids(tools["tokenizer"])}
            getattr(transformers, class_name).config_class(**config).save_pretrained(directory / name)
        else:
            file_name = "scheduler_config.json" if name == "scheduler" else "config.json"
            document = {"_class_name": class_name, "_diffusers_version": diffusers.__version__, **config}
            (directory / name / file_name).write_text(json.dumps(document, indent=2))
    (directory / "model_index.json").write_text(json.dumps(index, indent=2))
    return directory


def _vision_token_ids(tokenizer) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return {"image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
            "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>")}


def cached_published_configs(hub_id: str) -> Path:
    """The config folder of `hub_id` under the cache, written on first use (a new folder when
    configs/published.yaml changes)."""
    entry = json.dumps(load_published_models()[hub_id], sort_keys=True, default=str)
    version = hashlib.sha256(entry.encode()).hexdigest()[:12]
    target = cache_root() / "published" / f"{hub_id.replace('/', '--')}-{version}"
    return cached_folder(target, lambda folder: write_published_configs(hub_id, folder))
