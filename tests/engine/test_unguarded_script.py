"""The reference system's example, as a plain script with no `if __name__ == "__main__":` guard."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

SCRIPT = """
from engine import Omni, OmniDiffusionSamplingParams, DiffusionParallelConfig
omni = Omni(model="tiny/z-image", parallel_config=DiffusionParallelConfig(tensor_parallel_size={tp}))
outputs = omni.generate("a cat reading a book", OmniDiffusionSamplingParams(num_inference_steps=9))
outputs[0].images[0].save({output!r})
"""


@pytest.mark.parametrize("how,tp", [("script", 2), ("stdin", 1)])  # a file main module, and none (as -c)
def test_unguarded_script_runs_and_leaves_nothing_behind(tmp_path, how, tp):
    output = tmp_path / "cat.png"
    source = SCRIPT.format(tp=tp, output=str(output))
    if how == "script":
        (tmp_path / "cat.py").write_text(source)
        command, stdin = [sys.executable, str(tmp_path / "cat.py")], None
    elif how == "-c":
        command, stdin = [sys.executable, "-c", source], None
    else:
        command, stdin = [sys.executable, "-"], source
    done = subprocess.run(command, input=stdin, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "leaked" not in done.stderr, done.stderr[-3000:]
    with Image.open(output) as image:
        assert image.size == (128, 128)  # tiny/z-image's default size
