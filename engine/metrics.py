"""Prometheus metrics of one server: what the engine and the HTTP layer record, in one registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ditserve_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=r)
        self.request_seconds = Histogram(
            "ditserve_request_seconds", "End-to-end HTTP latency of image requests", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("ditserve_queue_depth", "Requests waiting for a batch", registry=r)
        self.running = Gauge("ditserve_running_requests", "Requests being computed (with continuous scheduling, "
                             "in every running pipeline call)", registry=r)
        self.queue_seconds = Histogram("ditserve_queue_wait_seconds", "Time from admission to the start of its batch",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_images = Histogram("ditserve_batch_images", "Images per pipeline call",
                                      buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), registry=r)
        self.forward_rows = Histogram("ditserve_forward_rows", "Rows (images x guidance branches) per DiT forward "
                                      "merged from running requests (continuous scheduling)",
                                      buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), registry=r)
        self.merged_forwards = Counter("ditserve_merged_forwards", "DiT forwards that ran the calls of more than one "
                                       "pipeline call (continuous scheduling)", registry=r)
        self.images = Counter("ditserve_images_generated", "Images produced", registry=r)
        self.step_seconds = Histogram("ditserve_step_seconds", "Duration of one denoising step of a batch",
                                      buckets=_STEP_BUCKETS, registry=r)
        self.steps_cached = Counter("ditserve_steps_cached", "Denoising steps whose DiT blocks were skipped or "
                                    "predicted (step caching)", registry=r)
        self.prompt_cache_hits = Counter("ditserve_prompt_cache_hits", "Text-encoder calls answered from the "
                                         "prompt-embedding cache", registry=r)
        self.result_cache_hits = Counter("ditserve_result_cache_hits", "Requests answered from the result cache "
                                         "(an identical earlier request with a seed)", registry=r)
        self.compiles = Counter("ditserve_compiles", "Graphs compiled while serving requests, after warm-up (a shape "
                                "first seen; each is logged)", registry=r)
        self.compile_seconds = Counter("ditserve_compile_seconds", "Seconds requests spent waiting for compiles",
                                       registry=r)
        self.cancelled = Counter("ditserve_requests_cancelled", "Requests stopped by disconnect or timeout", registry=r)
        self.worker_restarts = Counter("ditserve_worker_restarts", "Times the worker group was restarted", registry=r)
        self.parallel_size = Gauge("ditserve_parallel_size", "Ranks along each axis of the parallel layout "
                                   "(tp, ulysses, cfg; world = their product)", ["axis"], registry=r)
        self.rank_pid = Gauge("ditserve_rank_pid", "Process id of each rank of the current worker group", ["rank"],
                              registry=r)
