"""`serve --replicas N` (or `--ray-address`, `--autoscaling`): N ditserve servers behind one
endpoint, as one Ray Serve application. Imported only in that mode (`pip install 'ditserve[ray]'`).

Each replica is a whole server: this package's FastAPI app around its own engine and worker group,
so routes, errors, auth and streaming are the same as without Ray. Ray's HTTP proxy on --host and
--port routes every request with Ray Serve's router: of two replicas it samples (both, when there
are two), the one with fewer ongoing requests; a request is ongoing exactly while it waits in that
replica's queue or runs, so the signal is the queue length. A replica answers 429 itself when its
queue is full, which the router avoids while the other sampled replica has room (up to races
within a burst: routings at the same instant may read the same counts).

Ray places each replica in a placement group of one bundle, STRICT_PACK: its CPUs and, on GPUs,
one GPU per rank, so Ray gives the replica (and the rank processes it starts) their own devices.
A replica whose rank dies fails its requests with 503, reports itself unhealthy and is replaced
by Ray; it does not restart its worker group in place. Images of `response_format=url` live in a
directory every replica reads (--image-store-dir). Each replica reports its queue and image count
to a small named actor every second, which /metrics adds to the answering replica's own metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import tempfile
import threading
import time
from collections import deque

import ray
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from ray import serve

from engine import AsyncEngine, EngineConfig
from server.app import create_app
from server.settings import ServerSettings

logger = logging.getLogger(__name__)

APPLICATION = "ditserve"
BOARD = "ditserve-replica-board"
_REPORT_EVERY_S = 1.0
_CONTROL_SLOTS = 8  # requests a replica takes beyond its queue: /health, /metrics, url fetches
# Ray Serve runs user code and the proxy's router on event loops of their own threads by default;
# on the replica's and proxy's main loops a request skips two thread hops (1-client latency over a
# plain server in benchmarks/ray_replicas.py: +17-32% -> +11-15%). The router leaves out a replica
# that does not tell its queue length within 0.1 s (Ray's default), so on a loaded host an idle
# replica could be passed over for a busy one; an image takes seconds, so waiting up to 1 s (5 s
# after repeated misses) for an honest answer costs little. Read by the processes Ray starts for a
# local cluster; a cluster joined with --ray-address keeps its own settings.
_RAY_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "1.0",
    "RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "5.0",
}
_RATE_WINDOW_S = 10.0


@ray.remote(num_cpus=0)
class ReplicaBoard:
    """Each replica's recent (time, queue depth, running, images generated) reports."""

    def __init__(self) -> None:
        self._reports: dict[str, deque] = {}

    def report(self, replica: str, queue_depth: int, running: int, images: int) -> None:
        self._reports.setdefault(replica, deque(maxlen=int(2 * _RATE_WINDOW_S / _REPORT_EVERY_S))).append(
            (time.time(), queue_depth, running, images))

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Replicas heard from in the last 5 s: their latest values and images/s over the window."""
        now, live = time.time(), {}
        for replica, reports in self._reports.items():
            at, queue_depth, running, images = reports[-1]
            if now - at > 5 * _REPORT_EVERY_S:
                continue
            since = next((r for r in reports if at - r[0] <= _RATE_WINDOW_S), reports[-1])
            rate = (images - since[3]) / (at - since[0]) if at > since[0] else 0.0
            live[replica] = {"queue_depth": queue_depth, "running": running, "images": images,
                             "images_per_second": rate}
        return live


def cluster_metrics(snapshot: dict[str, dict[str, float]]) -> bytes:
    """Per-replica and total queue depth and images/s, in Prometheus' text format."""
    registry = CollectorRegistry()
    per_replica = {name: Gauge(f"ditserve_replica_{name}", help_text, ["replica"], registry=registry)
                   for name, help_text in (("queue_depth", "Requests waiting, per replica"),
                                           ("running", "Requests being computed, per replica"),
                                           ("images", "Images generated, per replica"),
                                           ("images_per_second", f"Images per second over {_RATE_WINDOW_S:.0f} s"))}
    totals = {name: Gauge(f"ditserve_cluster_{name}", f"Sum over replicas: {name}", registry=registry)
              for name in ("queue_depth", "running", "images_per_second")}
    Gauge("ditserve_cluster_replicas", "Replicas reporting", registry=registry).set(len(snapshot))
    for replica, values in snapshot.items():
        for name, gauge in per_replica.items():
            gauge.labels(replica).set(values[name])
    for name, gauge in totals.items():
        gauge.set(sum(values[name] for values in snapshot.values()))
    return generate_latest(registry)


@serve.ingress()
class DitReplica:
    """One replica: loads before Ray routes to it, reports to the board, is healthy while it can serve."""

    async def __init__(self, engine_config: EngineConfig, settings: ServerSettings):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # to `serve`'s output
        self.name = serve.get_replica_context().replica_id.unique_id
        self.engine = AsyncEngine(dataclasses.replace(engine_config, restart_workers=False))
        self.board = ray.get_actor(BOARD, namespace=APPLICATION)
        self._asgi = create_app(self.engine, dataclasses.replace(settings, replica_name=self.name),
                              cluster_metrics=self._cluster_metrics)
        await self.engine.start()
        if not await self.engine.loaded():
            raise RuntimeError(self.engine.failure)
        self._reporter = asyncio.create_task(self._report_forever())
        logger.info("replica %s ready", self.name)

    def __serve_build_asgi_app__(self):
        return self._asgi

    def check_health(self) -> None:
        if not self.engine.healthy:
            raise RuntimeError(self.engine.failure)

    async def _report_forever(self) -> None:
        registry = self.engine.metrics.registry
        while True:
            with contextlib.suppress(Exception):  # the board is best effort: serving goes on without it
                await self.board.report.remote(
                    self.name, int(registry.get_sample_value("ditserve_queue_depth")),
                    int(registry.get_sample_value("ditserve_running_requests")),
                    int(registry.get_sample_value("ditserve_images_generated_total")))
            await asyncio.sleep(_REPORT_EVERY_S)

    async def _cluster_metrics(self) -> bytes:
        return cluster_metrics(await self.board.snapshot.remote())


@dataclasses.dataclass(frozen=True)
class RayPlan:
    """How the replicas are laid out: what `serve` passes to Ray Serve."""

    replicas: int = 1
    address: str | None = None  # an existing cluster ("auto", "ray://host:10001"); None starts a local one
    autoscaling: dict | None = None  # Ray Serve's autoscaling_config: min_replicas, max_replicas, ...
    cpus_per_replica: float = 1.0

    def deployment_options(self, engine_config: EngineConfig, on_gpus: bool) -> dict:
        world_size = engine_config.parallel_config.world_size
        bundle = {"CPU": self.cpus_per_replica, **({"GPU": float(world_size)} if on_gpus else {})}
        options = {
            "name": APPLICATION,
            "ray_actor_options": {"num_cpus": self.cpus_per_replica, "num_gpus": world_size if on_gpus else 0},
            "placement_group_bundles": [bundle],
            "placement_group_strategy": "STRICT_PACK",
            # a generation is ongoing while queued or running in the replica; the slots beyond the
            # queue keep /health, /metrics and url fetches flowing to a replica whose queue is full
            # (which answers a generation 429 itself)
            "max_ongoing_requests": engine_config.max_queue_size + _CONTROL_SLOTS,
            "health_check_period_s": 1.0,
            "health_check_timeout_s": 30.0,
            "graceful_shutdown_timeout_s": 30.0,
            "logging_config": {"enable_access_log": False},  # each replica logs its own line per request
        }
        if self.autoscaling:
            options["autoscaling_config"] = self.autoscaling
        else:
            options["num_replicas"] = self.replicas
        return options


def serve_on_ray(engine_config: EngineConfig, settings: ServerSettings, plan: RayPlan) -> None:
    """Start (or join) Ray, run the application on --host/--port, block until SIGINT/SIGTERM, then
    tear down what this process started."""
    for name, value in _RAY_ENV.items():
        os.environ.setdefault(name, value)
    ray.init(address=plan.address, namespace=APPLICATION, include_dashboard=False, log_to_driver=True)
    try:
        on_gpus = ray.cluster_resources().get("GPU", 0) > 0
        if settings.image_store_dir is None:
            settings = dataclasses.replace(settings, image_store_dir=tempfile.mkdtemp(prefix="ditserve-images-"))
            if plan.address is not None:
                logger.warning("replicas on other machines cannot read %s: pass --image-store-dir on a shared "
                               "mount for response_format=url", settings.image_store_dir)
        board = ReplicaBoard.options(name=BOARD, get_if_exists=True).remote()  # lives while referenced
        serve.start(http_options={"host": settings.host, "port": settings.port},
                    logging_config={"enable_access_log": False})
        deployment = serve.deployment(DitReplica, **plan.deployment_options(engine_config, on_gpus))
        serve.run(deployment.bind(engine_config, settings), name=APPLICATION, route_prefix="/", blocking=False)
        logger.info("ditserve ready on Ray Serve: %s x %s at http://%s:%d", _replicas(plan),
                    engine_config.parallel_config.layout.describe(), settings.host, settings.port)
        _wait_for_a_stop_signal()
        del board
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def _replicas(plan: RayPlan) -> str:
    if plan.autoscaling:
        return f"{plan.autoscaling.get('min_replicas', 1)}-{plan.autoscaling.get('max_replicas', 1)} replicas"
    return f"{plan.replicas} replica(s)"


def _wait_for_a_stop_signal() -> None:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
