"""Layouts: invalid ones fail before any process starts, naming what works; `auto` picks what the
published results favour; the memory report covers every mode."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from engine import DiffusionParallelConfig, Omni, resolve_model
from engine.memory_report import memory_report
from workers import RankLayout

GiB = 2**30


def test_the_rank_layout_puts_tensor_parallel_innermost():
    layout = RankLayout(tensor_parallel_size=2, ulysses_degree=2, cfg_parallel_size=2)
    assert layout.world_size == 8
    assert layout.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.groups("ulysses") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.groups("cfg") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [layout.coordinates(r) for r in (0, 3, 5)] == [(0, 0, 0), (0, 1, 1), (1, 0, 1)]


@pytest.mark.parametrize("sizes,message", [
    ((1, 5, 1), r"ulysses_degree=5 needs at least that many attention heads on every tensor-parallel rank, but "
                r"tiny/qwen-image's DiT at tensor_parallel_size=1 leaves 4: Ulysses degrees that work at this size: "
                r"1 to 4"),
    ((2, 3, 1), r"at tensor_parallel_size=2 leaves 2: Ulysses degrees that work at this size: 1 to 2"),
])
def test_an_impossible_layout_fails_before_any_process_starts(sizes, message):
    before = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match=message):
        Omni(model="tiny/qwen-image", parallel_config=DiffusionParallelConfig(*sizes))
    assert set(multiprocessing.active_children()) == before


@pytest.mark.parametrize("fields,message", [
    ({"cfg_parallel_size": 3}, "cfg_parallel_size=3 must be 1 or 2"),
    ({"ulysses_degree": 0}, "ulysses_degree=0 must be at least 1"),
])
def test_sizes_out_of_range_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        DiffusionParallelConfig(**fields)


@pytest.mark.parametrize("model,devices,expected", [
    ("tiny/qwen-image", 2, (1, 1, 2)),  # true CFG: the branches first
    ("tiny/qwen-image", 4, (1, 2, 2)),  # then Ulysses
    ("tiny/qwen-image", 3, (1, 3, 1)),  # an odd count cannot hold two CFG groups
    ("tiny/qwen-image", 16, (2, 4, 2)),  # 4 heads stop Ulysses at 4; TP takes the rest
    ("tiny/z-image", 2, (1, 2, 1)),  # guidance 0: one branch, so no CFG parallel
    ("tiny/sd3", 2, (1, 1, 2)),  # batched CFG counts too
])
def test_auto_prefers_cfg_then_ulysses_then_tensor_parallel(model, devices, expected):
    config, reason = DiffusionParallelConfig.auto(devices, resolve_model(model))
    assert (config.tensor_parallel_size, config.ulysses_degree, config.cfg_parallel_size) == expected
    assert config.world_size == devices and reason


@pytest.mark.parametrize("device_gib,expected", [(80, (1, 4, 2)), (40, (2, 2, 2)), (24, (4, 1, 2))])
def test_auto_uses_tensor_parallelism_only_as_far_as_memory_requires(device_gib, expected):
    """Qwen-Image in bf16 (~58 GB: 41 GB DiT, 17 GB text encoder) on eight devices."""
    config, reason = DiffusionParallelConfig.auto(8, resolve_model("Qwen/Qwen-Image", configs_only=True),
                                                  device_gib * GiB, torch.bfloat16)
    assert (config.tensor_parallel_size, config.ulysses_degree, config.cfg_parallel_size) == expected
    assert f"of {device_gib:.1f} GiB" in reason


def test_the_memory_report_covers_every_axis():
    model = resolve_model("tiny/flux")
    report = memory_report(model, RankLayout(tensor_parallel_size=2, ulysses_degree=2, cfg_parallel_size=2),
                           torch.float32)
    tp_only = memory_report(model, RankLayout(tensor_parallel_size=2), torch.float32)
    assert len(report) == 8
    for rank, memory in enumerate(report):
        assert memory.dit == tp_only[rank % 2].dit  # replicated across Ulysses and CFG groups
        assert (memory.text_encoders > 0) == (rank < 2)  # only the driver's TP group runs them
        assert (memory.vae > 0) == (rank == 0)


def test_serve_parallel_auto_takes_one_rank_per_core_on_a_cpu(monkeypatch):
    from server import cli, commands

    monkeypatch.setattr(commands, "usable_cores", lambda: 2)
    parsed = cli.build_serve_parser().parse_args(["tiny/qwen-image", "--parallel", "auto"])
    config = commands._auto_parallel_config(parsed)
    assert (config.tensor_parallel_size, config.ulysses_degree, config.cfg_parallel_size) == (1, 1, 2)
    explicit = cli.build_serve_parser().parse_args(["tiny/qwen-image", "--parallel", "auto", "--usp", "2"])
    with pytest.raises(ValueError, match="--parallel auto chooses the sizes itself"):
        commands._auto_parallel_config(explicit)
