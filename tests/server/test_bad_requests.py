"""One bad request never hurts another: every input the schema admits is served or refused with a
4xx naming its parameter, at TP=1 and TP=2, while ordinary requests next to it get their images and
no rank restarts; a fault inside a rank fails only its request; every connection is bounded."""

from __future__ import annotations

import io
import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import SERVE, ServerProcess, b64_pixels, wait_until

LONG_PROMPT = " ".join(["a small yellow triangle at the top left on a purple background"] * 16)  # ~1,000 chars
ORDINARY = [dict(prompt="a red fox", seed=21), dict(prompt="a green frog", seed=22)]


@pytest.fixture(params=["tp1", "tp2"])
def server(request, z_image_server, tp2_server) -> ServerProcess:
    return {"tp1": z_image_server, "tp2": tp2_server}[request.param]


def generate(server: ServerProcess, **fields) -> httpx.Response:
    body = {"prompt": "a cat", "size": "64x64", "num_inference_steps": 2, **fields}
    return httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=300)


def edit(server: ServerProcess, side: int, **fields) -> httpx.Response:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buffer, "PNG")
    data = {"prompt": "a cat", "num_inference_steps": "2", **{k: str(v) for k, v in fields.items()}}
    return httpx.post(f"{server.url}/v1/images/edits", data=data, files={"image": ("in.png", buffer.getvalue())},
                      timeout=300)


def assert_refused(response: httpx.Response, param: str, *words: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"], error
    for word in words:
        assert word in error["message"], error


def test_the_inputs_that_gave_500_are_served_or_refused_beside_ordinary_requests(server: ServerProcess):
    restarts = server.metric("ditserve_worker_restarts_total")
    jobs = {
        "ordinary0": lambda: generate(server, **ORDINARY[0]),
        "ordinary1": lambda: generate(server, **ORDINARY[1]),
        "long_prompt": lambda: generate(server, prompt=LONG_PROMPT, seed=23),
        "edit_smaller": lambda: edit(server, 128, size="64x64"),
        "edit_larger": lambda: edit(server, 64, size="128x128"),
        "edit_too_large": lambda: edit(server, 4096),
        "zero_strength": lambda: edit(server, 64, strength=0),
        "too_much_work": lambda: generate(server, size="2048x2048", num_inference_steps=200, n=10),
    }
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        got = {name: future.result() for name, future in futures.items()}
    for name in ("ordinary0", "ordinary1"):
        assert got[name].status_code == 200, got[name].text
        alone = generate(server, **ORDINARY[int(name[-1])])
        assert np.abs(b64_pixels(got[name].json()["data"][0]["b64_json"]) -
                      b64_pixels(alone.json()["data"][0]["b64_json"])).max() <= 1
    assert got["long_prompt"].status_code == 200, got["long_prompt"].text
    assert "prompt truncated" in got["long_prompt"].headers["x-ditserve-warning"]
    assert "x-ditserve-warning" not in got["ordinary0"].headers
    for name, side in (("edit_smaller", 64), ("edit_larger", 128)):  # resized to the asked size, as OpenAI does
        assert got[name].status_code == 200, got[name].text
        assert b64_pixels(got[name].json()["data"][0]["b64_json"]).shape == (side, side, 3)
    assert_refused(got["edit_too_large"], "image", "2048")
    assert_refused(got["zero_strength"], "strength", "no denoising step")
    assert_refused(got["too_much_work"], "size", "megapixel-steps")
    assert server.metric("ditserve_worker_restarts_total") == restarts
    far = generate(server, size="1024x1024", num_inference_steps=1)
    assert far.status_code == 200 and "far from the 128x128" in far.headers["x-ditserve-warning"]


def test_a_fault_inside_a_followers_forward_fails_only_its_request(tp2_server: ServerProcess, inject_fault):
    restarts, pids = tp2_server.metric("ditserve_worker_restarts_total"), tp2_server.rank_pids()
    inject_fault(1)
    failed = generate(tp2_server, seed=5)
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "generation_failed"
    assert "rank 1: InjectedFault" in failed.json()["error"]["message"]
    assert generate(tp2_server, seed=5).status_code == 200
    assert tp2_server.metric("ditserve_worker_restarts_total") == restarts and tp2_server.rank_pids() == pids


def test_a_json_body_over_the_limit_gets_413_unread(z_image_server: ServerProcess):
    huge = {"prompt": "a cat", "user": "x" * (5 * 2**20)}
    for headers in ({}, {"transfer-encoding": "chunked"}):
        content = httpx.Request("POST", "/", json=huge).content
        body = iter([content[i:i + 65536] for i in range(0, len(content), 65536)]) if headers else content
        response = httpx.post(f"{z_image_server.url}/v1/images/generations", content=body, timeout=60,
                              headers={"content-type": "application/json", **headers})
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
    assert generate(z_image_server, user="x" * 1000).status_code == 200


def test_a_client_that_trickles_its_headers_is_cut_off(tp2_server: ServerProcess):
    with socket.create_connection(("127.0.0.1", tp2_server.port)) as connection:
        connection.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: test\r\n")
        connection.settimeout(0.3)
        closed = False
        deadline = time.monotonic() + 60  # bounds a hang only: the server's limit is 1 s
        while not closed and time.monotonic() < deadline:
            try:
                connection.sendall(b"X")  # a byte at a time: resets uvicorn's own idle timer
                closed = connection.recv(1024) == b""
            except socket.timeout:
                continue
            except OSError:
                closed = True
        assert closed
    assert generate(tp2_server).status_code == 200


def test_a_client_that_stalls_in_its_body_gets_408(tp2_server: ServerProcess):
    with socket.create_connection(("127.0.0.1", tp2_server.port)) as connection:
        connection.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        connection.settimeout(60)  # bounds a hang only: the server's limit is 1 s
        answer = b""
        while chunk := connection.recv(4096):  # until the server closes the connection
            answer += chunk
    head, _, body = answer.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 408"), head
    assert json.loads(body)["error"]["code"] == "request_timeout"


def test_shutdown_answers_running_and_queued_requests_503(tmp_path):
    server = ServerProcess(["tiny/z-image", "--max-batch-size", "1", "--shutdown-timeout", "1"])
    server.start(tmp_path / "serve.log")
    outcome = {}

    def long_request():
        outcome["plain"] = generate(server, num_inference_steps=200, size="1024x1024")

    def streamed_request():
        body = {"prompt": "a dog", "size": "64x64", "num_inference_steps": 2, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/images/generations", json=body, timeout=300) as response:
            outcome["stream"] = (response.status_code, response.read().decode())

    threads = [threading.Thread(target=long_request), threading.Thread(target=streamed_request)]
    threads[0].start()
    server.wait_until_running()
    threads[1].start()
    wait_until(lambda: server.metric("ditserve_queue_depth") >= 1, 60, "queued")
    server.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(timeout=120)
    plain = outcome["plain"]
    assert plain.status_code == 503 and plain.headers["retry-after"]
    assert plain.json()["error"]["code"] == "model_not_ready" and "shutting down" in plain.json()["error"]["message"]
    status, events = outcome["stream"]
    assert status == 200 and "event: error" in events and "shutting down" in events
    assert server.process.wait(timeout=60) == 0


def test_serve_exits_1_when_the_model_cannot_load(tiny_dir, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_dir("z-image"), broken)
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.write_bytes(b"\x00" * 64)
    done = subprocess.run([SERVE, str(broken), "--port", "0"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "could not load" in done.stderr


def test_serve_refuses_a_taken_port_before_loading():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([SERVE, "tiny/z-image", "--port", str(port)], capture_output=True, text=True,
                              timeout=120)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "worker group started" not in done.stderr  # nothing was loaded


def test_openapi_documents_what_is_sent_and_every_reference_resolves(z_image_server: ServerProcess):
    document = httpx.get(f"{z_image_server.url}/openapi.json").json()

    def references(node):
        if isinstance(node, dict):
            if "$ref" in node:
                yield node["$ref"]
            for value in node.values():
                yield from references(value)
        elif isinstance(node, list):
            for value in node:
                yield from references(value)

    for ref in set(references(document)):
        target = document
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]  # KeyError: a reference that does not resolve
    for path in ("/v1/images/generations", "/v1/images/edits"):
        responses = document["paths"][path]["post"]["responses"]
        assert "422" not in responses
        assert {"200", "400", "404", "413", "415", "429", "500", "503"} <= set(responses), (path, set(responses))
    wrong_method = httpx.delete(f"{z_image_server.url}/v1/images/generations")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    for body in (b'{"prompt": "\xff\xfe"}', b"[" * 5000 + b"]" * 5000, b'{"prompt": "x", "size": "13"}',
                 b'{"prompt": "x", "loras": "[nope"}'):
        response = httpx.post(f"{z_image_server.url}/v1/images/generations", content=body,
                              headers={"content-type": "application/json"})
        assert response.status_code == 400, body[:40]
        error = response.json()["error"]
        assert error["code"] and "{" not in error["message"].replace("{name, scale}", ""), error
