"""Step caching through `serve` and the OpenAI SDK: the flags, a request's `cache`, the metric."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import ServerProcess, served
from tests.helpers import b64_pixels as pixels

REQUEST = dict(prompt="a red fox in snow", size="64x64")
BODY = {"seed": 5, "num_inference_steps": 7}


@pytest.fixture(scope="module")
def caching_server(tmp_path_factory):
    yield from served(tmp_path_factory, "caching", "tiny/z-image", "--cache-backend", "first_block_cache",
                      "--cache-config", json.dumps({"threshold": 10.0, "warmup_steps": 2, "max_cached_steps": 3}),
                      "--result-cache-bytes", str(2**20))


def test_a_caching_server_skips_steps_and_cache_off_gives_the_plain_picture(caching_server: ServerProcess,
                                                                            z_image_server: ServerProcess):
    plain = pixels(z_image_server.client().images.generate(**REQUEST, extra_body=BODY).data[0].b64_json)
    before = caching_server.metric("ditserve_steps_cached_total")
    cached = pixels(caching_server.client().images.generate(**REQUEST, extra_body=BODY).data[0].b64_json)
    assert caching_server.metric("ditserve_steps_cached_total") == before + 4
    assert "steps=7 batch=1" in caching_server.log() and "cached_steps=4" in caching_server.log()
    off = pixels(caching_server.client().images.generate(**REQUEST, extra_body={**BODY, "cache": "off"})
                 .data[0].b64_json)
    assert np.array_equal(off, plain) and not np.array_equal(cached, plain)
    assert caching_server.metric("ditserve_steps_cached_total") == before + 4
    # the same body again (a client retrying) is answered from the result cache: no step runs
    repeated = pixels(caching_server.client().images.generate(**REQUEST, extra_body=BODY).data[0].b64_json)
    assert np.array_equal(repeated, cached) and caching_server.metric("ditserve_result_cache_hits_total") == 1
    assert caching_server.metric("ditserve_steps_cached_total") == before + 4
    assert "result_cache=hit" in caching_server.log()


def test_a_threshold_override_is_checked(caching_server: ServerProcess):
    import httpx

    response = httpx.post(f"{caching_server.url}/v1/images/generations",
                          json={**REQUEST, **BODY, "cache_threshold": 0}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "cache_threshold"
