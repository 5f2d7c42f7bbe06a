"""Real `serve` processes (uvicorn + worker ranks) for the HTTP tests, one per configuration."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from engine.worker_group import free_port

SERVE = str(Path(sys.executable).parent / "serve")
STARTUP_TIMEOUT_S = 180


@dataclass
class ServerProcess:
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    health_seen: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_path: Path) -> "ServerProcess":
        self.log_path = log_path
        self.process = subprocess.Popen(
            [SERVE, *self.args, "--port", str(self.port)],
            stdout=log_path.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **self.env},
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited with {self.process.returncode}:\n{self.log()[-5000:]}")
            try:
                status = httpx.get(f"{self.url}/health", timeout=2).status_code
                self.health_seen.append(status)
                if status == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"serve did not become ready in {STARTUP_TIMEOUT_S} s:\n{self.log()[-5000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)


def _server(tmp_path_factory, name: str, *args: str):
    server = ServerProcess(list(args)).start(tmp_path_factory.mktemp(name) / "serve.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def z_image_server(tmp_path_factory):
    yield from _server(tmp_path_factory, "z-image", "tiny/z-image", "--omni")


@pytest.fixture(scope="session")
def edit_server(tmp_path_factory):
    yield from _server(tmp_path_factory, "edit", "tiny/qwen-image-edit", "--default-sampling-params",
                       '{"num_inference_steps": 2}', "--max-upload-bytes", str(2**20))
