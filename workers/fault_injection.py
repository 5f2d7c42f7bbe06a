"""A test hook: make one rank raise inside its next DiT forwards, to show a fault fails only its batch.

Off unless the engine's environment names a file in DITSERVE_FAULT_FILE (the test suite does, for
every rank it starts). While that file holds "RANK" or "RANK TIMES", that rank raises in its next
DiT call (TIMES calls, default 1) and then removes the file.
"""

from __future__ import annotations

import os
from pathlib import Path

FAULT_FILE_ENV = "DITSERVE_FAULT_FILE"


class InjectedFault(RuntimeError):
    pass


def maybe_raise(rank: int) -> None:
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
