"""The `serve` process itself: tensor parallelism end to end, API keys, and failing fast on a bad model."""

from __future__ import annotations

import subprocess
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.helpers import SERVE, ServerProcess
from tests.helpers import b64_pixels as pixels

API_KEY = "sk-test-7f3a9c"


def test_tensor_parallel_server_matches_tp1(z_image_server: ServerProcess, tp2_server: ServerProcess):
    """(tp2_server checks that it stops cleanly, exit 0, when the session ends.)"""
    request = dict(prompt="a red fox in snow", size="64x64", extra_body={"seed": 11, "num_inference_steps": 3})
    expected = pixels(z_image_server.client().images.generate(**request).data[0].b64_json)
    result = tp2_server.client().images.generate(**request)
    assert "tensor_parallel_size=2" in tp2_server.log()
    assert np.abs(pixels(result.data[0].b64_json) - expected).max() <= 1


def test_api_key_guards_v1_routes_only_and_the_playground_can_be_off(tmp_path):
    # Random weights from the configuration (--load-format dummy), quantized, VAE tiled and sliced: auth does
    # not care, and those flags get a server run.
    server = ServerProcess(["tiny/z-image", "--log-level", "debug", "--load-format", "dummy", "--disable-playground",
                            "--quantization", "gguf:Q4_K", "--vae-use-tiling", "--vae-use-slicing"],
                           env={"DITSERVE_API_KEY": API_KEY})
    server.start(tmp_path / "serve.log")
    try:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": API_KEY}):
            response = httpx.get(f"{server.url}/v1/models", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").images.generate(prompt="a cat", size="64x64")
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert httpx.get(f"{server.url}/").status_code == 404  # --disable-playground
        good = server.client(api_key=API_KEY).images.generate(
            prompt="a cat", size="64x64", extra_body={"num_inference_steps": 1})
        assert len(good.data) == 1 and pixels(good.data[0].b64_json).shape == (64, 64, 3)
        assert "(tensor_parallel_size=1, gguf:Q4_K weights, max_batch_size=8)" in server.log()
    finally:
        server.stop()
    assert API_KEY not in server.log()


def test_bad_model_exits_nonzero_quickly_with_the_reason():
    started = time.monotonic()
    done = subprocess.run([SERVE, "tiny/no-such-family", "--port", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "tiny/no-such-family" in done.stderr and "tiny/z-image" in done.stderr
    assert time.monotonic() - started < 30


def test_the_ready_line_prints_a_curl_that_makes_an_image(z_image_server: ServerProcess, tmp_path):
    """The command printed when the server is ready, pasted into a shell as it is."""
    log = z_image_server.log()
    command = log[log.index("ditserve ready:"):].split("\n")[1].strip()
    assert command.startswith("curl ")
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "image.png") as image:
        assert image.size == (128, 128)  # tiny/z-image's default
