"""The training recipe of `builtin/shapes` runs end to end and writes a folder plain diffusers loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import torch
import yaml

from tools.shapes.train import HERE

REPOSITORY = Path(__file__).resolve().parents[2]


def test_a_shortened_recipe_trains_and_writes_a_z_image_folder(tmp_path):
    recipe = yaml.safe_load((HERE / "recipe.yaml").read_text())
    # The shipped recipe with every stage cut to two steps, one drawing per scene, and a narrower
    # VAE (encoding every training scene is most of the time).
    recipe["vae_training"]["steps"] = recipe["dit_training"]["steps"] = 2
    recipe["vae"]["block_out_channels"] = [4, 4, 4, 4]
    recipe["dit_training"].update(images_per_scene=1, batch_size=4, warmup_steps=1)
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    output = tmp_path / "shapes"
    subprocess.run(
        [sys.executable, "-m", "tools.shapes.train", "--recipe", str(recipe_path), "--output", str(output)],
        cwd=REPOSITORY, check=True, timeout=600,
    )
    report = json.loads((output / "training.json").read_text())
    assert report["recipe"]["dit_training"]["steps"] == 2 and np.isfinite(report["final_loss"]["dit"])

    pipeline = diffusers.DiffusionPipeline.from_pretrained(output)
    assert type(pipeline).__name__ == "ZImagePipeline"
    assert pipeline.vae.config.scaling_factor != 1.0  # set from the encoded scenes
    image = pipeline("a red circle on a blue background", height=128, width=128, num_inference_steps=2,
                     generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (128, 128, 3) and np.isfinite(image).all()
