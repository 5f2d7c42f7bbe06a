"""Real `serve` processes shared by the HTTP tests, one per configuration."""

from __future__ import annotations

import pytest

from tests.helpers import served


@pytest.fixture(scope="session")
def z_image_server(tmp_path_factory):
    """Also answers to an OpenAI model name, as a drop-in for OpenAI clients."""
    yield from served(tmp_path_factory, "z-image", "tiny/z-image", "--omni", "--served-model-name", "tiny/z-image",
                      "gpt-image-1")


@pytest.fixture(scope="session")
def tp2_server(tmp_path_factory):
    """TP=2 (vLLM's short flag), and a 1 s read timeout for the slow-client tests; it must stop cleanly (exit 0)."""
    servers = served(tmp_path_factory, "tp2", "tiny/z-image", "-tp", "2", "--read-timeout", "1")
    server = next(servers)
    yield server
    next(servers, None)
    assert server.process.returncode == 0, server.log()[-3000:]


@pytest.fixture(scope="session")
def edit_server(tmp_path_factory):
    yield from served(tmp_path_factory, "edit", "tiny/qwen-image-edit", "--default-sampling-params",
                       '{"num_inference_steps": 2}', "--max-upload-bytes", str(2**20))
