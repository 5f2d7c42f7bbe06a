"""Entry point of every rank process: set up the device, load this rank's part, serve commands."""

from __future__ import annotations

import logging
import multiprocessing
import queue
import time
import traceback

import diffusers
import torch
import transformers

from workers.messages import GenerationFailure, WorkerReady, WorkerSpec, WorkerStartupFailed
from workers.pipeline_runner import PipelineRunner, load_pipeline

logger = logging.getLogger(__name__)

_POLL_S = 1.0


def run_worker(rank: int, spec: WorkerSpec, requests: "multiprocessing.Queue | None", events) -> None:
    """Process target (spawned): report ready or the startup error, then serve until told to stop."""
    started = time.perf_counter()
    try:
        _configure_device(rank, spec)
        runner = PipelineRunner(load_pipeline(spec))
    except BaseException:
        events.put(WorkerStartupFailed(rank=rank, message=traceback.format_exc()))
        return
    events.put(WorkerReady(rank=rank, load_s=time.perf_counter() - started))
    _drive(runner, requests, events)


def _configure_device(rank: int, spec: WorkerSpec) -> None:
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if spec.device_type == "cuda":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(spec.threads_per_rank)


def _parent_alive() -> bool:
    parent = multiprocessing.parent_process()
    return parent is None or parent.is_alive()


def _drive(runner: PipelineRunner, requests, events) -> None:
    """Driver loop: one request at a time from the engine; None means stop."""
    while True:
        try:
            request = requests.get(timeout=_POLL_S)
        except queue.Empty:
            if not _parent_alive():
                return
            continue
        if request is None:
            return
        try:
            events.put(runner.run(request))
        except Exception as exc:  # the request fails, the worker lives on
            logger.exception("request %s failed", request.request_id)
            events.put(
                GenerationFailure(
                    request_id=request.request_id,
                    message=f"{type(exc).__name__}: {exc}",
                    error_type="server_error",
                )
            )
