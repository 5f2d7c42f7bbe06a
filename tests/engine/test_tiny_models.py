"""The tiny zoo: ordinary diffusers checkpoints, built deterministically."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.helpers import FAMILIES, load_plain_pipeline


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_is_a_plain_diffusers_checkpoint(tiny_dir, family):
    path = tiny_dir(family)
    index = json.loads((path / "model_index.json").read_text())
    libraries = {entry[0] for name, entry in index.items() if not name.startswith("_")}
    assert libraries <= {"diffusers", "transformers", None}  # None: an optional component left out
    assert list(path.glob("transformer/*.safetensors"))
    pipeline = load_plain_pipeline(path)
    assert type(pipeline).__name__ == index["_class_name"]
    assert sum(p.numel() for p in pipeline.transformer.parameters()) < 5_000_000


def test_make_tiny_is_deterministic(tmp_path, tiny_dir):
    subprocess.run(
        [sys.executable, "-m", "server.cli", "make-tiny", "tiny/sd3", str(tmp_path / "a")], check=True
    )
    first = load_file(tmp_path / "a" / "transformer" / "diffusion_pytorch_model.safetensors")
    second = load_file(tiny_dir("sd3") / "transformer" / "diffusion_pytorch_model.safetensors")
    assert first.keys() == second.keys()
    assert all(first[name].equal(second[name]) for name in first)


def test_make_tiny_rejects_unknown_name(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "make-tiny", "tiny/nope", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert "no tiny model named 'nope'" in result.stderr and "tiny/flux" in result.stderr
