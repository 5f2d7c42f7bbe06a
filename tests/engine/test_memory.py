"""Per-rank memory at full size (computed on the meta device from the published configurations)
meets the promise of tensor parallelism, and `--load-format dummy` serves without a checkpoint."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from engine import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams, resolve_model
from engine.memory_report import memory_report
from engine.models.published_models import published_model_ids

MiB, GiB = 2**20, 2**30


@pytest.mark.parametrize("world_size", [4, 8])
@pytest.mark.parametrize("hub_id", published_model_ids())
def test_every_rank_holds_about_one_nth_at_full_size(hub_id, world_size):
    ranks = memory_report(resolve_model(hub_id, configs_only=True), world_size, torch.bfloat16)
    dit_total, total = sum(r.dit for r in ranks), sum(r.total for r in ranks)
    assert max(r.dit for r in ranks) <= 1.10 * dit_total / world_size + 64 * MiB
    assert max(r.total for r in ranks) <= 1.15 * total / world_size + 0.5 * GiB


def test_memory_command_works_offline_for_a_published_id():
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "memory", "Qwen/Qwen-Image", "--tensor-parallel-size", "8"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert "Qwen/Qwen-Image (qwen-image), tensor_parallel_size=8, bfloat16 parameters" in lines[0]
    assert len(lines) == 2 + 8 and lines[2].split()[1:3] == ["4.76", "GiB"]  # rank 0's DiT shard


def test_dummy_weights_serve_at_tp2_x_cfg2_and_load_what_the_report_says():
    """Four ranks: the DiT shard on every rank, text encoders on the driver's TP group, VAE on rank 0."""
    parallel = DiffusionParallelConfig(tensor_parallel_size=2, cfg_parallel_size=2)
    with Omni(model="tiny/z-image", parallel_config=parallel, load_format="dummy") as omni:
        image = omni.generate("a cat", OmniDiffusionSamplingParams(num_inference_steps=2, height=64, width=96))[0]
        loaded = omni.rank_parameter_bytes()
    assert image.images[0].size == (96, 64)
    report = memory_report(resolve_model("tiny/z-image"), parallel.layout, torch.float32)
    assert len(loaded) == len(report) == 4
    for held, expected in zip(loaded, report):
        assert held["transformer"] == expected.dit
        assert held.get("text_encoder", 0) == expected.text_encoders
        assert held.get("vae", 0) == expected.vae
    assert [r.text_encoders > 0 for r in report] == [True, True, False, False]
    assert report[0].dit == report[2].dit and report[1].dit == report[3].dit
