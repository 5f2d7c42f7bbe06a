"""Shared fixtures: an isolated tiny-model cache and an offline hub (helpers live in tests/helpers.py)."""

from __future__ import annotations

import os
import tempfile

# Set before anything imports the engine: spawned rank processes inherit the environment.
os.environ["DITSERVE_CACHE"] = tempfile.mkdtemp(prefix="ditserve-test-cache-")
os.environ["HF_HUB_OFFLINE"] = "1"
# Every rank the suite starts (servers included) raises in its DiT while this file names it (inject_fault).
FAULT_FILE = os.path.join(os.environ["DITSERVE_CACHE"], "inject-fault")
os.environ["DITSERVE_FAULT_FILE"] = FAULT_FILE

import pytest  # noqa: E402

from engine.tiny_adapters import build_random_adapter  # noqa: E402
from engine.tiny_models import cached_tiny_model  # noqa: E402

TEXT_ENCODER_LORA = {"flux", "sd3"}  # the families whose diffusers pipeline loads text-encoder LoRA


@pytest.fixture
def inject_fault():
    """inject_fault(rank, times=1): that rank of whichever group runs next raises in its next `times`
    DiT calls (workers/fault_injection.py); cleared after the test."""
    def arm(rank: int, times: int = 1) -> None:
        with open(FAULT_FILE, "w") as handle:
            handle.write(f"{rank} {times}")
    yield arm
    if os.path.exists(FAULT_FILE):
        os.remove(FAULT_FILE)


@pytest.fixture(scope="session")
def tiny_dir():
    """tiny_dir("flux") -> the cached tiny checkpoint folder, built once per session."""
    return lambda family: cached_tiny_model(f"tiny/{family}")


@pytest.fixture(scope="session")
def adapters(tmp_path_factory):
    """adapters("flux") -> {"a": folder, "b": folder}: random LoRA adapters in diffusers' format, built
    once per session. "a": rank 4, alpha 8 saved in its config, DiT blocks plus the first text encoder
    where the family loads text-encoder LoRA; "b": rank 2, no saved config (alpha = rank), DiT only."""
    built: dict[str, dict] = {}

    def for_family(family: str) -> dict:
        if family not in built:
            folder = tmp_path_factory.mktemp(f"lora-{family}")
            built[family] = {
                "a": build_random_adapter(f"tiny/{family}", folder / "a", rank=4, seed=1, alpha=8,
                                          text_encoder=family in TEXT_ENCODER_LORA),
                "b": build_random_adapter(f"tiny/{family}", folder / "b", rank=2, seed=2),
            }
        return built[family]
    return for_family
