"""Hub downloads take only the diffusers-format files the pipeline loads (checked on a fake
repository laid out on disk as the real FLUX.1-dev and SD3.5-large repositories are)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub.utils import filter_repo_objects

from engine.models.published_models import write_published_configs
from engine.models.resolver import hub_allow_patterns

# Files of the real repositories besides the diffusers folders (abridged where they repeat).
EXTRA_FILES = {
    "black-forest-labs/FLUX.1-dev": ["flux1-dev.safetensors", "ae.safetensors", "README.md", "LICENSE.md",
                                     "dev_grid.jpg"],
    "stabilityai/stable-diffusion-3.5-large": [
        "sd3.5_large.safetensors", "text_encoders/clip_g.safetensors", "text_encoders/clip_l.safetensors",
        "text_encoders/t5xxl_fp16.safetensors", "text_encoders/README.md", "README.md", "sd3.5_large_demo.png"],
}
WEIGHTS = {  # diffusers-format weights per component, as the repositories split them
    "transformer": ["diffusion_pytorch_model-00001-of-00003.safetensors",
                    "diffusion_pytorch_model-00002-of-00003.safetensors",
                    "diffusion_pytorch_model-00003-of-00003.safetensors",
                    "diffusion_pytorch_model.safetensors.index.json"],
    "text_encoder": ["model.safetensors"],
    "text_encoder_2": ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                       "model.safetensors.index.json", "pytorch_model.bin"],
    "text_encoder_3": ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                       "model.safetensors.index.json"],
    "vae": ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"],
}


def fake_repository(hub_id: str, root: Path) -> list[str]:
    """Write the repository's layout (empty weight files) and return its file list."""
    write_published_configs(hub_id, root)
    for name, files in WEIGHTS.items():
        if (root / name).is_dir():
            for file in files:
                (root / name / file).touch()
    for file in EXTRA_FILES[hub_id]:
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        (root / file).touch()
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


@pytest.mark.parametrize("hub_id", sorted(EXTRA_FILES))
def test_only_the_pipeline_folders_are_downloaded(hub_id, tmp_path):
    files = fake_repository(hub_id, tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    chosen = set(filter_repo_objects(files, allow_patterns=hub_allow_patterns(index)))
    components = [name for name, entry in index.items() if isinstance(entry, list)]
    expected = {file for file in files
                if file == "model_index.json"
                or (file.split("/")[0] in components and not file.endswith((".bin", ".md", ".png", ".jpg")))}
    assert chosen == expected
    assert not any(file in chosen for file in EXTRA_FILES[hub_id])  # no single-file checkpoints
    assert "transformer/diffusion_pytorch_model-00002-of-00003.safetensors" in chosen
    assert "tokenizer/tokenizer_config.json" in chosen and "scheduler/scheduler_config.json" in chosen
