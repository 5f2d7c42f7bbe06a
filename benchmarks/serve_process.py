"""Start a real `serve` process for a benchmark and wait until /health answers 200."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

from engine.host import free_port

SERVE = str(Path(sys.executable).parent / "serve")


def start_server(model: str, *flags: str) -> tuple[subprocess.Popen, str, float]:
    """(process, base url, seconds from spawn to ready); the caller terminates the process."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    process = subprocess.Popen([SERVE, model, "--port", str(port), "--log-level", "warning", *flags],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        if process.poll() is not None:
            raise SystemExit(f"serve exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url, time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(0.05)
