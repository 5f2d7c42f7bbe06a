"""model= resolution: tiny names, local folders, hub ids; every failure is a clear ValueError."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from engine import resolve_model


def test_tiny_name_resolves_to_cached_folder_with_tiny_defaults():
    model = resolve_model("tiny/flux")
    assert (model.path / "model_index.json").is_file()
    assert model.family.name == "flux"
    assert (model.defaults.height, model.defaults.num_inference_steps) == (128, 9)


def test_local_folder_resolves_with_family_defaults(tiny_dir, tmp_path):
    copy = shutil.copytree(tiny_dir("sd3"), tmp_path / "my-sd3")
    model = resolve_model(str(copy))
    assert model.family.name == "sd3" and model.path == copy
    assert model.defaults.num_inference_steps == 28  # the real family's default


@pytest.mark.parametrize(
    "model,message",
    [
        ("tiny/nope", "unknown tiny model 'tiny/nope'; built-in: tiny/z-image, tiny/qwen-image"),
        ("no-such-thing", r"not a local directory, not a built-in model \(builtin/shapes, tiny/z-image"),
        ("builtin/nope", "unknown built-in model 'builtin/nope'; built-in: builtin/shapes"),
        ("./missing/dir", "not a local directory"),
    ],
)
def test_bad_names_say_what_would_work(model, message):
    with pytest.raises(ValueError, match=message):
        resolve_model(model)


def test_hub_id_offline_fails_fast_naming_the_id_and_the_way_out():
    started = time.monotonic()
    with pytest.raises(ValueError) as error:
        resolve_model("Tongyi-MAI/Z-Image-Turbo")
    assert time.monotonic() - started < 10
    message = str(error.value)
    assert "'Tongyi-MAI/Z-Image-Turbo' is not in the local Hugging Face cache" in message
    assert "hf download Tongyi-MAI/Z-Image-Turbo" in message and "local diffusers folder" in message


def test_folder_without_model_index_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="is not a diffusers pipeline folder"):
        resolve_model(str(tmp_path))


def test_unsupported_pipeline_class_lists_supported_families(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    expected = r"'StableDiffusionXLPipeline' is not supported; supported families: .*z-image \(ZImagePipeline\)"
    with pytest.raises(ValueError, match=expected):
        resolve_model(str(tmp_path))
