"""`serve --replicas 2`: two worker groups behind one endpoint on a local Ray cluster the server
starts (Ray Serve), tiny/z-image at TP=1, one CPU each. Routing, the shared url store, per-replica
metrics, a replica replaced after its rank is killed, and nothing left running after SIGTERM."""

from __future__ import annotations

import io
import os
import re
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from engine import DiffusionParallelConfig, EngineConfig, Omni, OmniDiffusionSamplingParams
from tests.helpers import ServerProcess, alive, b64_pixels, served, wait_until

pytest.importorskip("ray.serve", reason="the ray extra is not installed")

REPLICA = "x-ditserve-replica"
STEPS = 3


def generate(server: ServerProcess, timeout: float = 300, **fields) -> httpx.Response:
    body = {"prompt": "a cat", "size": "64x64", "num_inference_steps": STEPS, **fields}
    return httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=timeout)


def cluster(server: ServerProcess) -> dict[str, dict[str, float]]:
    """replica -> {queue_depth, running, images, images_per_second} from the cluster part of /metrics."""
    text = httpx.get(f"{server.url}/metrics").text
    replicas: dict[str, dict[str, float]] = {}
    for name, replica, value in re.findall(r'^ditserve_replica_(\w+)\{replica="([^"]+)"\} (\S+)$', text, re.M):
        replicas.setdefault(replica, {})[name] = float(value)
    return replicas


def replica_processes(server: ServerProcess) -> dict[str, tuple[int, list[int]]]:
    """replica -> (its actor's pid, its rank pids), from the replicas' log lines in serve's output."""
    log, actors, ranks = server.log(), {}, {}
    for pid, name in re.findall(r"pid=(\d+)\).*replica (\w+) ready", log):
        actors[int(pid)] = name
    for pid, pids in re.findall(r"pid=(\d+)\).*rank pids ([\d, ]+)", log):
        ranks[int(pid)] = [int(p) for p in re.findall(r"\d+", pids)]
    return {name: (pid, ranks[pid]) for pid, name in actors.items()}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    yield from served(tmp_path_factory, "ray", "tiny/z-image", "--replicas", "2", "--cpus-per-replica", "1")


def test_concurrent_requests_use_both_replicas_and_match_a_single_server(replicas: ServerProcess):
    seeds = list(range(40, 48))
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda seed: generate(replicas, seed=seed, prompt=f"cat {seed}"), seeds))
    assert [r.status_code for r in responses] == [200] * 8
    assert len({r.headers[REPLICA] for r in responses}) == 2
    # every replica reports to /metrics (per replica and in total), whichever replica answers
    wait_until(lambda: sum(r["images"] for r in cluster(replicas).values()) >= 8, 30, "the board caught up")
    text = httpx.get(f"{replicas.url}/metrics").text
    assert re.search(r"^ditserve_cluster_replicas 2\.0$", text, re.M)
    assert float(re.search(r"^ditserve_cluster_images_per_second (\S+)$", text, re.M).group(1)) > 0
    assert float(re.search(r"^ditserve_cluster_queue_depth (\S+)$", text, re.M).group(1)) == 0
    with Omni(model="tiny/z-image") as omni:
        for seed, response in zip(seeds, responses):
            alone = omni.generate(f"cat {seed}", OmniDiffusionSamplingParams(
                seed=seed, num_inference_steps=STEPS, height=64, width=64))[0].images[0]
            assert np.abs(b64_pixels(response.json()["data"][0]["b64_json"]) - np.asarray(alone)).max() <= 1, seed


def test_a_url_made_by_one_replica_is_served_by_the_other(replicas: ServerProcess):
    response = generate(replicas, seed=5, response_format="url")
    maker, url = response.headers[REPLICA], response.json()["data"][0]["url"]
    fetched = [httpx.get(url) for _ in range(40)]  # Ray picks replicas at random among the less loaded
    others = [f for f in fetched if f.headers[REPLICA] != maker]
    assert others and all(f.status_code == 200 and f.content == fetched[0].content for f in fetched)
    assert Image.open(io.BytesIO(fetched[0].content)).size == (64, 64)


def test_a_replica_whose_rank_dies_fails_its_request_and_ray_replaces_it(replicas: ServerProcess):
    processes = replica_processes(replicas)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(response=generate(
        replicas, num_inference_steps=200, size="512x512", n=2)))
    thread.start()
    wait_until(lambda: any(r["running"] for r in cluster(replicas).values()), 120, "a replica running it")
    victim = next(name for name, r in cluster(replicas).items() if r["running"])
    actor, ranks = processes[victim]
    os.kill(ranks[0], signal.SIGKILL)
    thread.join(timeout=120)
    response = outcome["response"]
    assert response.status_code == 503 and response.headers[REPLICA] == victim
    assert response.json()["error"]["code"] == "worker_died"
    # Ray sees the replica unhealthy, stops it and starts another; the survivor serves meanwhile
    wait_until(lambda: victim not in cluster(replicas) and len(cluster(replicas)) == 2, 180, "a new replica")
    assert not alive(actor) and not any(alive(pid) for pid in ranks)
    after = [generate(replicas, seed=seed) for seed in range(4)]
    assert [r.status_code for r in after] == [200] * 4


def test_sigterm_leaves_no_process(replicas: ServerProcess):
    """Last: stops the module's server (Ray, the replicas, every rank)."""
    pids = [pid for actor, ranks in replica_processes(replicas).values() for pid in (actor, *ranks)]
    assert any(alive(pid) for pid in pids)
    replicas.stop()
    assert replicas.process.returncode == 0
    wait_until(lambda: not any(alive(pid) for pid in pids), 30, "replicas and ranks gone")
    assert not [line for line in os.popen("ps -eo args").read().splitlines() if line.startswith("ray::")]


def test_each_replica_reserves_its_devices_and_autoscaling_passes_through():
    from server.ray_replicas import RayPlan

    config = EngineConfig(model="tiny/z-image", parallel=DiffusionParallelConfig(tensor_parallel_size=2,
                                                                                 cfg_parallel_size=2))
    options = RayPlan(replicas=3, cpus_per_replica=4).deployment_options(config, on_gpus=True)
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["placement_group_bundles"] == [{"CPU": 4, "GPU": 4.0}]  # one GPU per rank, on one node
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 4}
    assert options["max_ongoing_requests"] == config.max_queue_size + 1
    autoscaling = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2}
    options = RayPlan(autoscaling=autoscaling).deployment_options(config, on_gpus=False)
    assert options["autoscaling_config"] == autoscaling and "num_replicas" not in options
    assert options["placement_group_bundles"] == [{"CPU": 1.0}] and options["ray_actor_options"]["num_gpus"] == 0


def test_runtime_lora_loading_is_refused_with_replicas():
    from server.cli import serve_main

    with pytest.raises(SystemExit, match="--enable-lora-loading changes one server's adapters"):
        serve_main(["tiny/z-image", "--replicas", "2", "--enable-lora-loading"])
    with pytest.raises(SystemExit, match="--autoscaling must be a JSON object"):
        serve_main(["tiny/z-image", "--autoscaling", "{min_replicas: 1}"])
