"""The online engine's queue: which waiting requests share a pipeline call, which go next, and what
happens to a batch's results.

A batch starts with the oldest waiting request and takes, in arrival order, every later request
with the same batch key until it holds `max_batch_size` images. The oldest request always runs
next, so no request waits behind others forever, whatever their parameters. A shared batch that
fails in the pipeline goes back to run each request alone.

Request scheduling: one batch on the ranks at a time. Continuous scheduling: up to
`max_active` batches at once, each its own pipeline call on the driver, whose DiT calls merge step
by step there (workers/parallel/step_merger.py); a batch joins the running ones only with the same
LoRA adapters (they act on the whole DiT) and never with step caching on (one skip decision per
call), so no picture depends on who else was running.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Protocol

from engine.metrics import Metrics
from engine.outputs import PartialImage
from engine.worker_group import WorkerGroup
from workers import (
    FailureKind,
    GenerationBatch,
    GenerationFailure,
    GenerationPartial,
    GenerationRequest,
    GenerationResult,
)

logger = logging.getLogger(__name__)


class HasRequest(Protocol):
    request: GenerationRequest
    alone: bool


@dataclasses.dataclass(eq=False)
class Pending:
    """An admitted request: its future gets the rank's result (or an engine error)."""

    request: GenerationRequest
    future: asyncio.Future
    submitted: float
    started: float | None = None
    on_partial: Callable[[PartialImage], None] | None = None
    alone: bool = False  # runs in a batch of its own: its shared batch failed (see `Scheduler._retry_alone`)
    repeat_key: Hashable | None = None  # where its result goes in the result cache (engine.outputs.ResultCache)
    repeated: bool = False  # answered from the result cache: never queued


def batch_key(request: GenerationRequest) -> Hashable:
    """Requests with equal keys differ only in prompt, negative prompt and seed."""
    if request.images:  # input images are pipeline-wide: an edit request runs alone
        return ("alone", request.request_id)
    if request.sampling.cache == "on":  # a skip decision is one per call: a caching request runs alone, so its
        return ("alone", request.request_id)  # picture never depends on who else was waiting
    # A pipeline takes negative prompts for all prompts or for none; LoRA adapters apply to a whole call.
    return request.sampling, request.negative_prompt is None, request.loras


def concurrency_key(pending: HasRequest) -> Hashable:
    """Batches with equal keys may run at once (continuous scheduling)."""
    request = pending.request
    if pending.alone or request.sampling.cache == "on":
        return ("alone", request.request_id)
    return request.loras


def take_batch(waiting: Sequence[HasRequest], max_images: int) -> list[HasRequest]:
    """The next batch: the oldest item plus compatible later ones (the oldest alone may exceed max_images)."""
    head = waiting[0]
    if head.alone:
        return [head]
    key, images = batch_key(head.request), head.request.sampling.num_outputs_per_prompt
    batch = [head]
    for item in waiting[1:]:
        count = item.request.sampling.num_outputs_per_prompt
        if images + count > max_images:
            break
        if not item.alone and batch_key(item.request) == key:
            batch.append(item)
            images += count
    return batch


def _failed_in_pipeline(result: object) -> bool:
    return isinstance(result, GenerationFailure) and result.kind is FailureKind.PIPELINE_ERROR


def _interrupted(result: object) -> bool:
    return isinstance(result, GenerationFailure) and result.kind is FailureKind.INTERRUPTED


class Scheduler:
    """Owns the waiting and running requests; runs on the event loop."""

    def __init__(self, max_batch_size: int, metrics: Metrics, scheduling: str = "request", max_active: int = 1):
        self.max_batch_size = max_batch_size
        self.metrics = metrics
        self.continuous = scheduling == "continuous"
        self.max_active = max_active if self.continuous else 1
        self.waiting: list[Pending] = []
        self.running: list[Pending] = []
        self._in_flight: set[asyncio.Task] = set()  # continuous: the batches on the ranks
        self.wake = asyncio.Event()
        metrics.queue_depth.set_function(lambda: len(self.waiting))
        metrics.running.set_function(lambda: len(self.running))

    @property
    def admitted(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, pending: Pending) -> None:
        self.waiting.append(pending)
        self.wake.set()

    def cancel(self, pending: Pending, group: WorkerGroup | None) -> None:
        """Dropped if still waiting, else stopped at its next step."""
        self.metrics.cancelled.inc()
        if pending in self.waiting:
            self.waiting.remove(pending)
        elif pending in self.running and group is not None:
            group.cancel(pending.request.request_id)

    def cancel_running(self, group: WorkerGroup) -> None:
        for pending in self.running:
            group.cancel(pending.request.request_id)

    async def run_waiting(self, group: WorkerGroup, can_run: Callable[[], bool]) -> None:
        """Request scheduling: run batches until the queue is empty or `can_run()` turns false.
        Continuous: start every batch that may join the running ones now; each wakes the loop when done."""
        if not self.continuous:
            while self.waiting and can_run():
                batch = take_batch(self.waiting, self.max_batch_size)
                await self._finish(batch, self._start(group, batch))
            return
        while self.waiting and can_run() and len(self._in_flight) < self.max_active:
            batch = take_batch(self.waiting, self.max_batch_size)
            if self.running and concurrency_key(batch[0]) != concurrency_key(self.running[0]):
                return  # the oldest waits for the running ones to finish; nothing overtakes it
            task = asyncio.ensure_future(self._finish(batch, self._start(group, batch)))
            self._in_flight.add(task)
            task.add_done_callback(self._landed)

    def _landed(self, task: asyncio.Task) -> None:
        self._in_flight.discard(task)
        self.wake.set()

    def fail_all(self, error: Exception) -> None:
        pending, self.waiting = [*self.waiting, *self.running], []
        for item in pending:
            if not item.future.done():
                item.future.set_exception(error)

    def _start(self, group: WorkerGroup, batch: list[Pending]) -> list:
        """Move the batch from waiting to running and send it to the ranks: its futures."""
        now = time.perf_counter()
        self.waiting = [p for p in self.waiting if p not in batch]
        self.running.extend(batch)
        for pending in batch:
            pending.started = now
            self.metrics.queue_seconds.observe(now - pending.submitted)
        loop = asyncio.get_running_loop()
        handlers = {p.request.request_id: _on_loop(loop, p.on_partial) for p in batch if p.on_partial}
        return group.submit(GenerationBatch([p.request for p in batch]), handlers)

    async def _finish(self, batch: list[Pending], futures: list) -> None:
        """Wait for the batch's results and hand them to its requests (or queue them again alone)."""
        try:
            results = await asyncio.gather(*map(asyncio.wrap_future, futures), return_exceptions=True)
        finally:
            self.running = [p for p in self.running if p not in batch]
        retried = self._retry_alone(batch, results)
        for pending, result in zip(batch, results):
            if not pending.future.done() and pending not in retried:  # done: cancelled by its caller
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)
        self._observe(results)

    def _retry_alone(self, batch: list[Pending], results: list) -> list[Pending]:
        """When a shared batch fails in the pipeline (an error that may come from one request's
        input), its requests go back to the front of the queue to run one by one: the request that
        caused it fails again, alone; the others get the images they would have had (batching
        changes no image). Found by running each alone rather than by bisection: a batch holds at
        most max_batch_size images, and each retry's answer is final. Under continuous scheduling a
        request interrupted by a fault of the calls beside it (a merged forward that raised, or
        collectives aborted by a rank's fault) runs again alone the same way."""
        shared_failed = len(batch) > 1 and any(_failed_in_pipeline(result) for result in results)
        retried = [p for p, result in zip(batch, results) if not p.future.done() and (
            (shared_failed and _failed_in_pipeline(result)) or (_interrupted(result) and not p.alone))]
        if not retried:
            return []
        for pending in retried:
            pending.alone = True
        logger.warning("a batch of %d requests failed (%s); running each alone", len(batch),
                       next(r.message for r in results if _failed_in_pipeline(r) or _interrupted(r)))
        self.waiting[:0] = retried
        return retried

    def _observe(self, results: list) -> None:
        done = [r for r in results if isinstance(r, GenerationResult)]
        if done:
            self.metrics.batch_images.observe(done[0].batch_images)
            for rows in done[0].forward_rows:
                self.metrics.forward_rows.observe(rows)
            self.metrics.merged_forwards.inc(done[0].merged_forwards)
            for seconds in done[0].step_s:
                self.metrics.step_seconds.observe(seconds)
            self.metrics.images.inc(sum(len(r.images) for r in done))
            self.metrics.steps_cached.inc(sum(r.cached_steps for r in done))
            self.metrics.prompt_cache_hits.inc(done[0].prompt_cache_hits)  # the batch's, on each of its results
            compiled = done[0].compiled
            if compiled.graphs:
                logger.warning("requests %s waited %.1f s for %d graph(s) to compile: a shape the warm-up did not "
                               "run (--warmup-sizes)", ", ".join(r.request_id for r in done), compiled.seconds,
                               compiled.graphs)
                self.metrics.compiles.inc(compiled.graphs)
                self.metrics.compile_seconds.inc(compiled.seconds)


def _on_loop(loop: asyncio.AbstractEventLoop,
             callback: Callable[[PartialImage], None]) -> Callable[[GenerationPartial], None]:
    """From the group's reader thread onto the event loop."""
    def forward(event: GenerationPartial) -> None:
        loop.call_soon_threadsafe(callback, PartialImage.of(event))
    return forward
