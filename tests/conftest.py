"""Shared fixtures: an isolated tiny-model cache and an offline hub (helpers live in tests/helpers.py)."""

from __future__ import annotations

import os
import tempfile
import uuid

# Set before anything imports the engine: spawned rank processes inherit the environment. The
# tiny-model cache is one per run, shared by the pytest-xdist workers (they inherit the variable
# from the controller, which imports this file first; folders are written atomically).
os.environ.setdefault("DITSERVE_TEST_CACHE", tempfile.mkdtemp(prefix="ditserve-test-cache-"))
os.environ["DITSERVE_CACHE"] = os.environ["DITSERVE_TEST_CACHE"]
os.environ["HF_HUB_OFFLINE"] = "1"
# One inductor cache for the run (not the user's): every compiling test and rank shares the kernels
# the others built (a block's fused kernels are the same at any layout), and a run starts cold.
COMPILE_CACHE = os.path.join(os.environ["DITSERVE_CACHE"], "inductor")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = COMPILE_CACHE
# Every group the suite starts (servers included) reads these (workers/testing_hooks.py): a rank
# raises in its DiT while FAULT_FILE names it (inject_fault); a driver waits while it holds a file of
# HOLD_DIR. One of each per xdist worker, so one worker's fault never reaches another's ranks.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
FAULT_FILE = os.path.join(os.environ["DITSERVE_CACHE"], f"inject-fault-{_WORKER}")
HOLD_DIR = os.path.join(os.environ["DITSERVE_CACHE"], f"hold-{_WORKER}")
os.makedirs(HOLD_DIR, exist_ok=True)
os.environ["DITSERVE_FAULT_FILE"] = FAULT_FILE
os.environ["DITSERVE_HOLD_DIR"] = HOLD_DIR
# Qwen-Image-Edit conditions on its input at ~1 MP whatever the output size; the tiny models' edits
# use 128x128 conditions instead, here (the diffusers references) and in every rank.
os.environ["DITSERVE_EDIT_CONDITION_AREA"] = str(128 * 128)
# Under pytest-xdist every worker gets its share of the cores: its ranks (engine.host.usable_cores
# reads the variable) and torch here. Without it two workers each run 2-thread ranks on 2 cores,
# and the threads spin waiting for cores the other worker holds.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))

import pytest  # noqa: E402

from engine.models.tiny_adapters import build_random_adapter  # noqa: E402
from engine.models.tiny_models import cached_tiny_model  # noqa: E402
from workers.testing_hooks import HELD_PREFIX, shrink_edit_conditions  # noqa: E402

shrink_edit_conditions()

_FIRST = ("tests/server/", "tests/engine/test_compile.py", "tests/engine/test_compiled_layouts.py")


def pytest_collection_modifyitems(items) -> None:
    """The HTTP and compile tests first: under pytest-xdist (`make test`: `-n 2 --dist loadfile`, one
    file per worker at a time) the files that take longest start early instead of making the tail."""
    items.sort(key=lambda item: not item.nodeid.startswith(_FIRST))


TEXT_ENCODER_LORA = {"flux", "sd3"}  # the families whose diffusers pipeline loads text-encoder LoRA


@pytest.fixture
def inject_fault():
    """inject_fault(rank, times=1): that rank of whichever group runs next raises in its next `times`
    DiT calls (workers/testing_hooks.py); cleared after the test."""
    def arm(rank: int, times: int = 1) -> None:
        with open(FAULT_FILE, "w") as handle:
            handle.write(f"{rank} {times}")
    yield arm
    if os.path.exists(FAULT_FILE):
        os.remove(FAULT_FILE)


class Holds:
    """Worker groups held before a DiT call until released (workers/testing_hooks.py): each armed
    token holds the first group that finds it."""

    def arm(self, count: int = 1) -> None:
        for _ in range(count):
            with open(os.path.join(HOLD_DIR, f"token-{uuid.uuid4().hex}"), "w"):
                pass

    def held(self) -> int:
        return sum(name.startswith(HELD_PREFIX) for name in os.listdir(HOLD_DIR))

    def release(self) -> None:
        for name in os.listdir(HOLD_DIR):
            os.remove(os.path.join(HOLD_DIR, name))


@pytest.fixture
def holds():
    holder = Holds()
    yield holder
    holder.release()


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
