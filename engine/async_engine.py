"""AsyncEngine: the online engine behind the HTTP server: admission, batching, cancellation, recovery.

Requests wait in one bounded queue. A single scheduler task (on the server's event loop) takes the
next batch (engine.batching), hands it to the worker group and waits for it, so at most one batch
is on the ranks at a time and every decision about the queue is taken here. Loading, warm-up and
restarts run in threads so the server keeps answering /health meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable

from PIL import Image

from configs import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_LORA_RANK,
    DEFAULT_MAX_LORAS,
    DEFAULT_MAX_MEGAPIXEL_STEPS,
    DEFAULT_MAX_QUEUE_SIZE,
    DEFAULT_STARTUP_TIMEOUT_S,
    OmniDiffusionSamplingParams,
)
from engine.batching import take_batch
from engine.errors import EngineNotReady, GenerationError, QueueFull, RequestTimedOut, error_for
from engine.loras import LoraRegistry
from engine.metrics import Metrics
from engine.model_resolver import ResolvedModel, resolve_model
from engine.outputs import OmniRequestOutput, PartialImage, output_from_result
from engine.parallel_config import DiffusionParallelConfig, checked_offload, worker_spec
from engine.sampling import PromptInput, build_request
from engine.worker_group import WorkerGroup
from workers import (
    AdapterInfo,
    FailureKind,
    GenerationBatch,
    GenerationFailure,
    GenerationPartial,
    GenerationRequest,
    GenerationResult,
)

logger = logging.getLogger(__name__)


def _failed_in_pipeline(result: object) -> bool:
    return isinstance(result, GenerationFailure) and result.kind is FailureKind.PIPELINE_ERROR


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: str
    parallel: DiffusionParallelConfig = DiffusionParallelConfig()
    dtype: str = "auto"
    load_format: str = "auto"  # "dummy": full-size random weights from the configurations, no checkpoint
    default_overrides: OmniDiffusionSamplingParams = dataclasses.field(default_factory=OmniDiffusionSamplingParams)
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE  # requests waiting or running
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE  # images per pipeline call
    max_megapixel_steps: float | None = DEFAULT_MAX_MEGAPIXEL_STEPS  # one request's work cap (None: no cap)
    request_timeout_s: float | None = None
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S  # for every rank to load
    warm_up: bool = True
    lora_modules: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> path, loaded at start
    max_loras: int = DEFAULT_MAX_LORAS  # adapters resident on the ranks at once (LRU beyond)
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK
    text_encoder_offload: str | None = None  # device the text encoders stay on between uses ("cpu")
    vae_offload: str | None = None  # device the VAE stays on between uses
    # False under a supervisor that replaces the whole server (a Ray Serve replica): a dead rank
    # leaves the engine FAILED instead of restarting the worker group in place
    restart_workers: bool = True

    def __post_init__(self) -> None:
        for name in ("max_queue_size", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s={self.request_timeout_s} must be positive (or None: no limit)")
        if self.startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s={self.startup_timeout_s} must be positive")
        checked_offload(self.offload)

    @property
    def offload(self) -> dict[str, str | None]:
        return {"text_encoder": self.text_encoder_offload, "vae": self.vae_offload}


@dataclasses.dataclass(eq=False)
class _Pending:
    request: GenerationRequest
    future: asyncio.Future
    submitted: float
    started: float | None = None
    on_partial: Callable[[PartialImage], None] | None = None
    alone: bool = False  # runs in a batch of its own: its shared batch failed (see `_retry_alone`)


class AsyncEngine:
    def __init__(self, config: EngineConfig, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        self.state = EngineState.LOADING
        self.failure: str | None = None
        self.model: ResolvedModel | None = None
        self.loras = LoraRegistry(config.max_loras, reserved_names={config.model})
        self._group: WorkerGroup | None = None
        self._waiting: list[_Pending] = []
        self._running: list[_Pending] = []
        self._wake = asyncio.Event()
        self._lock = threading.Lock()
        self._task: asyncio.Task | None = None
        self._draining = False
        self.metrics.queue_depth.set_function(lambda: len(self._waiting))
        self.metrics.running.set_function(lambda: len(self._running))
        layout = config.parallel.layout
        for axis, size in (("tp", layout.tensor_parallel_size), ("ulysses", layout.ulysses_degree),
                           ("cfg", layout.cfg_parallel_size)):
            self.metrics.parallel_size.labels(axis).set(size)

    # lifecycle -------------------------------------------------------------------------------
    async def start(self, on_loaded: Callable[[], None] | None = None) -> None:
        """Begin loading in the background and schedule once loaded.

        on_loaded runs after the first load and after every restart, failed or not (see `healthy`).
        """
        if self._task is not None:  # started already (a Ray replica starts it before its app's lifespan)
            return
        self._loop = asyncio.get_running_loop()
        self._on_loaded = on_loaded or (lambda: None)
        self._loaded = asyncio.Event()
        self._task = asyncio.create_task(self._serve(), name="ditserve-scheduler")

    async def loaded(self) -> bool:
        """Wait for the first load to end; True when the engine can serve."""
        await self._loaded.wait()
        return self.healthy

    async def shutdown(self) -> None:
        """Stop admitting, fail what is left, stop every rank."""
        with self._lock:
            self.state = EngineState.STOPPED
            group, self._group = self._group, None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail_all(EngineNotReady("the server is shutting down"))
        if group is not None:
            await asyncio.to_thread(group.close)

    async def drain(self, timeout_s: float) -> None:
        """Before shutting down: admit nothing more, let admitted requests finish for up to
        `timeout_s`, then answer the rest EngineNotReady (503) and stop the running batch."""
        self._draining = True
        deadline = time.monotonic() + timeout_s
        while (self._waiting or self._running) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = [*self._waiting, *self._running]
        if left:
            logger.warning("shutting down: %d request(s) not done after %g s get 503", len(left), timeout_s)
            if self._group is not None:
                for pending in self._running:
                    self._group.cancel(pending.request.request_id)
            self._fail_all(EngineNotReady(self.not_ready_reason()))

    @property
    def healthy(self) -> bool:
        return self.state is EngineState.READY and self._group is not None and self._group.alive

    @property
    def accepting(self) -> bool:
        """Healthy and not shutting down: what /health reports and what admission requires."""
        return self.healthy and not self._draining

    def not_ready_reason(self) -> str:
        if self._draining:
            return "the server is shutting down"
        if self.state is EngineState.LOADING:
            return f"model {self.config.model!r} is still loading"
        if self.state is EngineState.FAILED:
            return f"model {self.config.model!r} cannot serve: {self.failure}"
        if self.state is EngineState.RESTARTING or (self._group is not None and not self._group.alive):
            return "the worker group is restarting after a rank died"
        return "the engine is stopped"

    # requests --------------------------------------------------------------------------------
    async def generate(self, prompt: PromptInput, params: OmniDiffusionSamplingParams,
                       on_partial: Callable[[PartialImage], None] | None = None) -> OmniRequestOutput:
        """Raises the errors of engine.errors: InvalidRequestError, EngineNotReady, QueueFull,
        RequestTimedOut, GenerationError, WorkerGroupDied. `on_partial` is called on the event loop
        with each preview (params.partial_images of them per image).

        Cancelling the awaiting task (a client that went away) or the timeout stops the request at
        its next denoising step.
        """
        return await self.result(self.admit(prompt, params, on_partial))

    def admit(self, prompt: PromptInput, params: OmniDiffusionSamplingParams,
              on_partial: Callable[[PartialImage], None] | None = None) -> _Pending:
        """Validate and queue one request (raises at once what `generate` raises before running);
        `result` waits for it. A streaming response admits first, so these errors are plain HTTP errors."""
        if not self.accepting:
            raise EngineNotReady(self.not_ready_reason())
        request = build_request(self.model, prompt, params, self.loras, self.config.max_megapixel_steps)
        for warning in request.warnings:
            logger.warning("request %s: %s", request.request_id, warning)
        admitted = len(self._waiting) + len(self._running)
        if admitted >= self.config.max_queue_size:
            raise QueueFull(f"{admitted} requests are already admitted (max_queue_size={self.config.max_queue_size})")
        pending = _Pending(request, self._loop.create_future(), time.perf_counter(), on_partial=on_partial)
        self._waiting.append(pending)
        self._wake.set()
        return pending

    async def result(self, pending: _Pending) -> OmniRequestOutput:
        try:
            result = await asyncio.wait_for(pending.future, timeout=self.config.request_timeout_s)
        except asyncio.CancelledError:
            self.cancel(pending)
            raise
        except asyncio.TimeoutError:
            self.cancel(pending)
            raise RequestTimedOut(
                f"the request did not finish within the request timeout ({self.config.request_timeout_s:g} s)"
            ) from None
        request = pending.request
        return output_from_result(request, result, pending.submitted, queue_s=pending.started - pending.submitted)

    async def load_lora(self, name: str, path: str) -> AdapterInfo:
        """Load a LoRA adapter on every rank (after the batch that runs now); LoraLoadError says why not."""
        if not self.healthy:
            raise EngineNotReady(self.not_ready_reason())
        return await asyncio.to_thread(self.loras.load, self._group, name, path)

    async def unload_lora(self, name: str) -> None:
        """Requests already admitted with this adapter fail; later ones are refused (404)."""
        if not self.healthy:
            raise EngineNotReady(self.not_ready_reason())
        await asyncio.to_thread(self.loras.unload, self._group, name)

    def cancel(self, pending: _Pending) -> None:
        """Stop an admitted request: dropped if still waiting, else stopped at its next step."""
        self.metrics.cancelled.inc()
        if pending in self._waiting:
            self._waiting.remove(pending)
        elif pending in self._running and self._group is not None:
            self._group.cancel(pending.request.request_id)

    # scheduling ------------------------------------------------------------------------------
    async def _serve(self) -> None:
        try:
            await asyncio.to_thread(self._start_group)
            self.state = EngineState.READY
        except Exception as exc:
            if self.state is not EngineState.STOPPED:
                self.failure, self.state = f"{type(exc).__name__}: {exc}", EngineState.FAILED
                logger.error("loading %s failed: %s", self.config.model, self.failure)
        finally:
            self._loaded.set()
            self._on_loaded()
        while self.state is EngineState.READY:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting and self.healthy:
                await self._run_batch(take_batch(self._waiting, self.config.max_batch_size))
            if self._group is not None and not self._group.alive:
                if not self.config.restart_workers:
                    self.failure, self.state = f"a rank died: {self._group.failure}", EngineState.FAILED
                    logger.error("%s; not restarting (the supervisor replaces this server)", self.failure)
                    self._fail_all(EngineNotReady(self.not_ready_reason()))
                    return
                await self._restart()

    async def _run_batch(self, batch: list[_Pending]) -> None:
        now = time.perf_counter()
        self._waiting = [p for p in self._waiting if p not in batch]
        self._running = batch
        for pending in batch:
            pending.started = now
            self.metrics.queue_seconds.observe(now - pending.submitted)
        handlers = {p.request.request_id: self._partial_handler(p.on_partial) for p in batch if p.on_partial}
        futures = self._group.submit(GenerationBatch([p.request for p in batch]), handlers)
        try:
            results = await asyncio.gather(*map(asyncio.wrap_future, futures), return_exceptions=True)
        finally:
            self._running = []
        retried = self._retry_alone(batch, results)
        for pending, result in zip(batch, results):
            if not pending.future.done() and pending not in retried:  # done: cancelled by its caller
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)
        self._observe(results)

    def _retry_alone(self, batch: list[_Pending], results: list) -> list[_Pending]:
        """When a shared batch fails in the pipeline (an error that may come from one request's
        input), its requests go back to the front of the queue to run one by one: the request that
        caused it fails again, alone; the others get the images they would have had (batching
        changes no image). Found by running each alone rather than by bisection: a batch holds at
        most max_batch_size images, and each retry's answer is final."""
        if len(batch) < 2 or not any(_failed_in_pipeline(result) for result in results):
            return []
        retried = [p for p, result in zip(batch, results) if _failed_in_pipeline(result) and not p.future.done()]
        for pending in retried:
            pending.alone = True
        logger.warning("a batch of %d requests failed (%s); running each alone", len(batch),
                       next(r.message for r in results if _failed_in_pipeline(r)))
        self._waiting[:0] = retried
        return retried

    def _partial_handler(self, callback: Callable[[PartialImage], None]) -> Callable[[GenerationPartial], None]:
        """From the group's reader thread onto the event loop."""
        def forward(event: GenerationPartial) -> None:
            self._loop.call_soon_threadsafe(callback, PartialImage.of(event))
        return forward

    def _observe(self, results: list) -> None:
        done = [r for r in results if isinstance(r, GenerationResult)]
        if done:
            self.metrics.batch_images.observe(done[0].batch_images)
            for seconds in done[0].step_s:
                self.metrics.step_seconds.observe(seconds)
            self.metrics.images.inc(sum(len(r.images) for r in done))

    async def _restart(self) -> None:
        old, reason = self._group, self._group.failure
        self.state = EngineState.RESTARTING
        self.metrics.worker_restarts.inc()
        logger.warning("restarting the worker group: %s", reason)
        await asyncio.to_thread(old.close)
        try:
            await asyncio.to_thread(self._start_group)
        except Exception as exc:
            if self.state is not EngineState.STOPPED:
                self.failure, self.state = f"restart failed: {type(exc).__name__}: {exc}", EngineState.FAILED
                logger.error("%s", self.failure)
                self._fail_all(EngineNotReady(self.not_ready_reason()))
                self._on_loaded()
            return
        self.state = EngineState.READY
        self._wake.set()  # requests that waited through the restart
        logger.info("worker group restarted")
        self._on_loaded()

    def _start_group(self) -> None:
        """Resolve, spawn, load and warm up (blocking: runs in a thread)."""
        model = resolve_model(self.config.model, configs_only=self.config.load_format == "dummy")
        model = dataclasses.replace(model, defaults=model.defaults.overridden_by(self.config.default_overrides))
        config = self.config
        spec = worker_spec(model, config.parallel, config.dtype, config.load_format, config.max_loras,
                           config.max_lora_rank, config.offload)
        group = WorkerGroup(spec, config.startup_timeout_s, on_death=self._on_death)
        group.start()
        try:
            if self._group is None:  # the first start
                self.loras.load_all(group, config.lora_modules)
            else:  # a restart: what was loaded before, from the same files
                self.loras.reload_into(group)
            if config.warm_up:
                self._warm_up(model, group)
        except BaseException:
            group.close()
            raise
        with self._lock:
            if self.state is EngineState.STOPPED:  # shut down while loading
                group.close()
                raise EngineNotReady("stopped while loading")
            self.model, self._group = model, group

    @staticmethod
    def _warm_up(model: ResolvedModel, group: WorkerGroup) -> None:
        """One generation with the fewest steps the family allows, at the default size, so the first
        user request is not the slow one."""
        started = time.perf_counter()
        side = model.family.size.min
        images = [Image.new("RGB", (side, side), (127, 127, 127))] if model.family.is_edit else []
        request = build_request(model, PromptInput("warm-up", images=images), OmniDiffusionSamplingParams(
            num_inference_steps=model.family.min_inference_steps, seed=0))
        result = group.submit(GenerationBatch([request]))[0].result()
        if isinstance(result, GenerationFailure):
            raise GenerationError(f"warm-up generation failed: {error_for(result)}")
        logger.info("warm-up generation done in %.2f s", time.perf_counter() - started)

    def _on_death(self, reason: str) -> None:
        """Called from the worker group's reader thread: wake the scheduler to restart."""
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self._loop.call_soon_threadsafe(self._wake.set)

    def _fail_all(self, error: Exception) -> None:
        pending, self._waiting = [*self._waiting, *self._running], []
        for item in pending:
            if not item.future.done():
                item.future.set_exception(error)
