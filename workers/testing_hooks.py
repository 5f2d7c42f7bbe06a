"""Hooks the test suite drives through files, so tests wait on events instead of racing the clock.

Both are off unless the engine's environment names their file or folder (the suite does, for
every rank it starts):
- DITSERVE_FAULT_FILE: while it holds "RANK" or "RANK TIMES", that rank raises in its next DiT
  calls (TIMES, default 1), then removes the file: a fault inside a rank, for the isolation tests.
- DITSERVE_HOLD_DIR: a driver rank that finds a file there claims it (renames it held-<pid>:
  atomic, so one file holds one group) and waits before its next DiT call (followers wait in
  their broadcast, outside any collective) until that file is gone: a group kept busy for
  exactly as long as a test needs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

FAULT_FILE_ENV = "DITSERVE_FAULT_FILE"
HOLD_DIR_ENV = "DITSERVE_HOLD_DIR"
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
