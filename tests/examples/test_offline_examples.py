"""The offline example script runs end to end and writes the asked image."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tools.shapes.judge import Verdict, judge

SCRIPT = Path(__file__).parents[2] / "examples" / "offline_inference" / "text_to_image" / "text_to_image.py"


def test_example_writes_image_of_asked_size(tmp_path):
    output = tmp_path / "cat.png"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", "tiny/flux", "--prompt", "a cat reading a book",
         "--tensor-parallel-size", "1", "--height", "80", "--width", "112", "--num-inference-steps", "3",
         "--seed", "7", "--output", str(output)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "seed 7" in result.stdout
    with Image.open(output) as image:
        assert image.size == (112, 80) and image.format == "PNG"


def test_example_with_the_default_model_draws_the_prompt(tmp_path):
    output = tmp_path / "circle.png"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--prompt", "a large red circle on the left on a blue background",
         "--seed", "1", "--output", str(output)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with Image.open(output) as image:
        assert image.size == (128, 128)  # builtin/shapes' default
        assert judge(np.asarray(image.convert("RGB"))) == Verdict("blue", "red", "left", "circle")


EDIT_SCRIPT = Path(__file__).parents[2] / "examples" / "offline_inference" / "image_to_image" / "image_edit.py"


def test_edit_example_writes_edited_image(tmp_path):
    source, output = tmp_path / "input.png", tmp_path / "edited.png"
    Image.new("RGB", (40, 40), (10, 200, 90)).save(source)
    result = subprocess.run(
        [sys.executable, str(EDIT_SCRIPT), "--model", "tiny/qwen-image-edit", "--image", str(source),
         "--prompt", "make it purple", "--tensor-parallel-size", "2", "--height", "64", "--width", "80",
         "--num-inference-steps", "2", "--seed", "4", "--output", str(output)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "seed 4" in result.stdout
    with Image.open(output) as image:
        assert image.size == (80, 64) and image.format == "PNG"
