"""`serve --replicas 2`: two worker groups behind one endpoint on a local Ray cluster the server
starts (Ray Serve), tiny/z-image at TP=1, one CPU each. Routing, the shared url store, per-replica
metrics, a replica replaced after its rank is killed, and nothing left running after SIGTERM."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from engine import DiffusionParallelConfig, EngineConfig, Omni, OmniDiffusionSamplingParams
from tests.helpers import ServerProcess, alive, b64_pixels, served, wait_until

pytest.importorskip("ray.serve", reason="the ray extra is not installed")

REPLICA = "x-ditserve-replica"
STEPS, SIDE = 6, 128  # long enough that 8 concurrent requests overlap and spread by queue length
QUEUE = 9  # per replica: 8 concurrent requests fit even in the one already held
QUICK = {"prompt": "a cat", "size": "64x64", "num_inference_steps": 2}


def generate(server: ServerProcess, timeout: float = 300, **fields) -> httpx.Response:
    body = {"prompt": "a cat", "size": f"{SIDE}x{SIDE}", "num_inference_steps": STEPS, **fields}
    return httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=timeout)


def cluster(server: ServerProcess) -> dict[str, dict[str, float]]:
    """replica -> {queue_depth, running, images, images_per_second} from the cluster part of /metrics."""
    text = httpx.get(f"{server.url}/metrics").text
    replicas: dict[str, dict[str, float]] = {}
    for name, replica, value in re.findall(r'^ditserve_replica_(\w+)\{replica="([^"]+)"\} (\S+)$', text, re.M):
        replicas.setdefault(replica, {})[name] = float(value)
    return replicas


def board_images(server: ServerProcess) -> float:
    return sum(replica.get("images", 0) for replica in cluster(server).values())


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
    """Both replicas answering: /health is 200 once Ray runs them, but the proxy's router may learn
    of the second a little later, and a test that starts before would see every request go to one."""
    servers = served(tmp_path_factory, "ray", "tiny/z-image", "--replicas", "2", "--cpus-per-replica", "1",
                     "--max-queue-size", str(QUEUE), "--max-batch-size", "1")
    server = next(servers)
    answered: list[str] = []

    def both_answered() -> bool:
        answered.append(httpx.post(f"{server.url}/v1/images/generations", json=QUICK, timeout=120).headers[REPLICA])
        return len(set(answered)) == 2
    wait_until(both_answered, 180, "both replicas answering", poll_s=0)
    wait_until(lambda: board_images(server) >= len(answered), 120, "the board shows them")
    yield server
    next(servers, None)


def test_concurrent_requests_use_both_replicas_and_match_a_single_server(replicas: ServerProcess, holds):
    """One replica is held inside a step (an event, not a long request); 8 concurrent requests are
    then answered by the idle one (the least loaded) while it stays held; once released, all are
    answered, each image equal to a single server's for its seed."""
    seeds = list(range(40, 48))
    before = board_images(replicas)
    holds.arm(1)

    async def scenario() -> tuple[str, set, list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=replicas.url, timeout=600) as client:
            held = asyncio.create_task(client.post("/v1/images/generations", json=QUICK))
            await asyncio.to_thread(wait_until, lambda: holds.held() == 1, 120, "a replica held")
            # the replicas report every second; on a loaded machine Ray's actors may lag far behind
            await asyncio.to_thread(wait_until, lambda: any(r["running"] for r in cluster(replicas).values()), 120,
                                    "the board shows it")
            busy = next(name for name, r in cluster(replicas).items() if r["running"])
            body = {"size": f"{SIDE}x{SIDE}", "num_inference_steps": STEPS}
            quick = [asyncio.create_task(client.post("/v1/images/generations", json={
                **body, "prompt": f"cat {seed}", "seed": seed})) for seed in seeds]
            # bounds a hang only: a request routed to the idle replica is answered in seconds
            done, _ = await asyncio.wait(quick, timeout=300, return_when=asyncio.FIRST_COMPLETED)
            while_held = {task.result().headers[REPLICA] for task in done}
            holds.release()
            await held
            return busy, while_held, await asyncio.gather(*quick)

    busy, while_held, responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * 8
    routed = [r.headers[REPLICA] for r in responses]
    # the idle replica answered while the other was held
    assert while_held and busy not in while_held, f"held: {busy}; answered while held: {while_held}; all: {routed}"
    # every replica reports to /metrics (per replica and in total), whichever replica answers
    wait_until(lambda: board_images(replicas) >= before + 9, 120, "the board caught up")
    text = httpx.get(f"{replicas.url}/metrics").text
    assert re.search(r"^ditserve_cluster_replicas 2\.0$", text, re.M)
    assert float(re.search(r"^ditserve_cluster_images_per_second (\S+)$", text, re.M).group(1)) > 0
    assert float(re.search(r"^ditserve_cluster_queue_depth (\S+)$", text, re.M).group(1)) == 0
    with Omni(model="tiny/z-image") as omni:
        for seed, response in zip(seeds, responses):
            alone = omni.generate(f"cat {seed}", OmniDiffusionSamplingParams(
                seed=seed, num_inference_steps=STEPS, height=SIDE, width=SIDE))[0].images[0]
            assert np.abs(b64_pixels(response.json()["data"][0]["b64_json"]) - np.asarray(alone)).max() <= 1, seed


def test_429_once_every_replica_is_full(replicas: ServerProcess, holds):
    """Both replicas held inside a step, so nothing they admit can finish; requests sent one at a
    time until both queues hold QUEUE each (Ray's counts of a replica's requests can lag, so one may
    meet a full queue early: it is answered 429, never lost); then any request is refused."""
    def admitted() -> list[int]:
        return sorted(int(r["queue_depth"] + r["running"]) for r in cluster(replicas).values())

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(base_url=replicas.url, timeout=600) as client:
            holds.arm(2)
            sent = []
            while sum(admitted()) < 2 * QUEUE:
                count = sum(admitted()) + 1
                sent.append(asyncio.create_task(client.post("/v1/images/generations", json=QUICK)))
                await asyncio.to_thread(wait_until, lambda: sum(admitted()) == count or sent[-1].done(), 120,
                                        f"{count} admitted", poll_s=0.25)  # few /metrics calls in flight
                if sent[-1].done():
                    assert sent[-1].result().status_code == 429  # refused by a full replica, never lost
            assert admitted() == [QUEUE, QUEUE] and holds.held() == 2
            extra = await client.post("/v1/images/generations", json={"prompt": "more", "size": "64x64"})
            holds.release()
            answers = await asyncio.gather(*sent)
            assert {r.status_code for r in answers} <= {200, 429} and [r.status_code for r in answers].count(200) \
                == 2 * QUEUE
            return extra

    extra = asyncio.run(scenario())
    assert extra.status_code == 429 and extra.json()["error"]["code"] == "queue_full"
    wait_until(lambda: not any(admitted()), 120, "idle")


def test_a_url_made_by_one_replica_is_served_by_the_other(replicas: ServerProcess):
    response = generate(replicas, seed=5, response_format="url")
    maker, url = response.headers[REPLICA], response.json()["data"][0]["url"]
    fetched = [httpx.get(url) for _ in range(40)]  # Ray picks replicas at random among the less loaded
    others = [f for f in fetched if f.headers[REPLICA] != maker]
    assert others and all(f.status_code == 200 and f.content == fetched[0].content for f in fetched)
    assert Image.open(io.BytesIO(fetched[0].content)).size == (SIDE, SIDE)


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


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (Ray's GCS and raylet, the actors under the raylet, their ranks)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = set(), [pid]
    while frontier:
        children = parents.get(frontier.pop(), [])
        found.update(children)
        frontier.extend(children)
    return found


def test_sigterm_leaves_no_process(replicas: ServerProcess):
    """Last: stops the module's server: Ray's processes, the replicas and every rank go with it."""
    below = descendants(replicas.process.pid)
    ranks = {pid for _, pids in replica_processes(replicas).values() for pid in pids if alive(pid)}
    assert len(ranks) == 2 and ranks <= below
    replicas.stop()
    assert replicas.process.returncode == 0
    wait_until(lambda: not any(alive(pid) for pid in below), 30, "every process it started gone")


def test_each_replica_reserves_its_devices_and_autoscaling_passes_through():
    from server.ray_replicas import RayPlan

    config = EngineConfig(model="tiny/z-image", parallel_config=DiffusionParallelConfig(tensor_parallel_size=2,
                                                                                 cfg_parallel_size=2))
    options = RayPlan(replicas=3, cpus_per_replica=4).deployment_options(config, on_gpus=True)
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["placement_group_bundles"] == [{"CPU": 4, "GPU": 4.0}]  # one GPU per rank, on one node
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 4}
    assert options["max_ongoing_requests"] > config.max_queue_size  # room for /health, /metrics, urls
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
    with pytest.raises(SystemExit, match="--autoscaling must be a JSON object, not"):
        serve_main(["tiny/z-image", "--autoscaling", "[1, 4]"])
    with pytest.raises(SystemExit, match="--replicas=0 must be at least 1"):
        serve_main(["tiny/z-image", "--replicas", "0"])
