"""Hooks the test suite drives through its environment, so tests wait on events instead of racing
the clock, and tiny models stay cheap.

All are off unless the engine's environment names them (the suite does, for every rank it starts):
- DITSERVE_FAULT_FILE: while it holds "RANK" or "RANK TIMES", that rank raises in its next DiT
  calls (TIMES, default 1), then removes the file: a fault inside a rank, for the isolation tests.
- DITSERVE_HOLD_DIR: a driver rank that finds a file there claims it (renames it held-<pid>:
  atomic, so one file holds one group) and waits before its next DiT call (followers wait in
  their broadcast, outside any collective) until that file is gone: a group kept busy for
  exactly as long as a test needs.
- DITSERVE_EDIT_CONDITION_AREA: the Qwen-Image-Edit pipelines size their input images to at
  most that many pixels (diffusers' own: ~1 MP for the VAE, whatever the output size), so a
  tiny model's 128x128 edit does not pay for a 1024x1024 condition. The suite sets it in its own
  process too, where the plain-diffusers references run, so both sides see the same pipeline.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

FAULT_FILE_ENV = "DITSERVE_FAULT_FILE"
HOLD_DIR_ENV = "DITSERVE_HOLD_DIR"
EDIT_AREA_ENV = "DITSERVE_EDIT_CONDITION_AREA"
HELD_PREFIX = "held-"
_HOLD_POLL_S = 0.02


class InjectedFault(RuntimeError):
    pass


def raise_if_asked(rank: int) -> None:
    path = os.environ.get(FAULT_FILE_ENV)
    if not path:
        return
    try:
        target, *times = (int(word) for word in Path(path).read_text().split())
    except (OSError, ValueError):
        return
    if target != rank:
        return
    left = (times[0] if times else 1) - 1
    if left > 0:
        Path(path).write_text(f"{rank} {left}")
    else:
        Path(path).unlink(missing_ok=True)
    raise InjectedFault(f"fault injected on rank {rank} ({FAULT_FILE_ENV}={path})")


def hold_if_asked() -> None:
    folder = os.environ.get(HOLD_DIR_ENV)
    if not folder:
        return
    held = Path(folder) / f"{HELD_PREFIX}{os.getpid()}"
    try:
        tokens = [name for name in os.listdir(folder) if not name.startswith(HELD_PREFIX)]
    except OSError:
        return
    for token in tokens:
        try:
            os.rename(Path(folder) / token, held)
            break
        except OSError:  # another group claimed it first
            continue
    while held.exists():
        time.sleep(_HOLD_POLL_S)


def shrink_edit_conditions() -> None:
    area = int(os.environ.get(EDIT_AREA_ENV) or 0)
    if not area:
        return
    from diffusers.pipelines.qwenimage import (
        pipeline_qwenimage_edit,
        pipeline_qwenimage_edit_inpaint,
        pipeline_qwenimage_edit_plus,
    )

    for module in (pipeline_qwenimage_edit, pipeline_qwenimage_edit_inpaint, pipeline_qwenimage_edit_plus):
        original = getattr(module.calculate_dimensions, "original", module.calculate_dimensions)

        def capped(target_area, ratio, original=original):
            return original(min(target_area, area), ratio)

        capped.original = original
        module.calculate_dimensions = capped
