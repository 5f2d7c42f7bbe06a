"""Worker processes start, report their real errors, and never outlive their Omni."""

from __future__ import annotations

import multiprocessing
import os
import shutil

import pytest

from engine import Omni, OmniDiffusionSamplingParams, WorkerStartupError
from tests.helpers import alive


def test_model_runs_in_a_separate_process_that_close_stops():
    omni = Omni(model="tiny/z-image")
    pids = omni.rank_pids()
    assert len(pids) == 1 and pids[0] != os.getpid() and alive(pids[0])
    assert omni.generate("x", OmniDiffusionSamplingParams(num_inference_steps=1, height=64, width=64))
    omni.close()
    assert not any(alive(pid) for pid in pids)
    omni.close()  # a second close is harmless


def test_context_manager_stops_workers_after_an_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with Omni(model="tiny/z-image") as omni:
            pids = omni.rank_pids()
            raise RuntimeError("boom")
    assert not any(alive(pid) for pid in pids)


def test_worker_that_fails_to_load_surfaces_its_real_error(tiny_dir, tmp_path):
    broken = shutil.copytree(tiny_dir("z-image"), tmp_path / "broken")
    weights = next((broken / "transformer").glob("*.safetensors"))
    weights.write_bytes(b"this is not a safetensors file")
    children_before = set(multiprocessing.active_children())
    with pytest.raises(WorkerStartupError) as error:
        Omni(model=str(broken))
    message = str(error.value)
    assert "rank 0 failed to load the model" in message
    assert "safetensors" in message.lower() or "header" in message.lower()
    assert set(multiprocessing.active_children()) == children_before
