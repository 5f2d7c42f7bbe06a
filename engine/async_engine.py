"""AsyncEngine: the online engine behind the HTTP server: its lifecycle (load, restart, drain,
shut down) and the request API; the queue and batches are the scheduler's (engine.scheduler).

A single scheduler task (on the server's event loop) runs the queue once the model is loaded, and
restarts the worker group when a rank dies. Loading, warm-up and restarts run in threads so the
server keeps answering /health meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable

from configs import OmniDiffusionSamplingParams
from engine.errors import EngineNotReady, QueueFull, RequestTimedOut
from engine.intake.sampling import PromptInput, build_request
from engine.loras import LoraRegistry
from engine.metrics import Metrics
from engine.models.resolver import ResolvedModel
from engine.outputs import OmniRequestOutput, PartialImage, ResultCache, output_from_result
from engine.scheduler import Pending, Scheduler
from engine.startup import EngineConfig, start_group
from engine.worker_group import WorkerGroup
from workers import AdapterInfo, GenerationResult

logger = logging.getLogger(__name__)


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"  # could not load or restart; stays FAILED through shutdown (serve exits 1)
    STOPPED = "stopped"


class AsyncEngine:
    def __init__(self, config: EngineConfig, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        self.state = EngineState.LOADING
        self.model: ResolvedModel | None = None
        self.loras = LoraRegistry(config.max_loras, reserved_names={config.model})
        self.scheduler = Scheduler(config.max_batch_size, self.metrics, config.scheduling, config.max_active_requests)
        self.results = ResultCache(config.result_cache_bytes)
        self._fatal: str | None = None  # why loading or a restart failed
        self._group: WorkerGroup | None = None
        self._lock = threading.Lock()
        self._task: asyncio.Task | None = None
        self._draining = False
        layout = config.parallel_config.layout
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
            if self.state is not EngineState.FAILED:
                self.state = EngineState.STOPPED
            group, self._group = self._group, None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.scheduler.fail_all(EngineNotReady("the server is shutting down"))
        if group is not None:
            await asyncio.to_thread(group.close)

    async def drain(self, timeout_s: float) -> None:
        """Before shutting down: admit nothing more, let admitted requests finish for up to
        `timeout_s`, then answer the rest EngineNotReady (503) and stop the running batch."""
        self._draining = True
        deadline = time.monotonic() + timeout_s
        while self.scheduler.admitted and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.scheduler.admitted:
            logger.warning("shutting down: %d request(s) not done after %g s get 503", self.scheduler.admitted,
                           timeout_s)
            if self._group is not None:
                self.scheduler.cancel_running(self._group)
            self.scheduler.fail_all(EngineNotReady(self.failure))

    @property
    def healthy(self) -> bool:
        return self.state is EngineState.READY and self._group is not None and self._group.alive

    @property
    def accepting(self) -> bool:
        """Healthy and not shutting down: what /health reports and what admission requires."""
        return self.healthy and not self._draining

    @property
    def failure(self) -> str | None:
        """Why the engine cannot serve now, None when it can: the one reason /health, a 503 and
        `serve`'s exit give."""
        if self.accepting:
            return None
        if self.state is EngineState.FAILED:
            return f"model {self.config.model!r} cannot serve: {self._fatal}"
        if self._draining:
            return "the server is shutting down"
        if self.state is EngineState.LOADING:
            return f"model {self.config.model!r} is still loading"
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
              on_partial: Callable[[PartialImage], None] | None = None) -> Pending:
        """Validate and queue one request (raises at once what `generate` raises before running);
        `result` waits for it. A streaming response admits first, so these errors are plain HTTP errors."""
        if not self.accepting:
            raise EngineNotReady(self.failure)
        request = build_request(self.model, prompt, params, self.loras, self.config.max_megapixel_steps,
                                self.config.cache_settings)
        for warning in request.warnings:
            logger.warning("request %s: %s", request.request_id, warning)
        repeat_key = self.results.key(request, seeded=params.seed is not None)
        repeated = self.results.get(repeat_key)
        if repeated is not None:  # costs the ranks nothing, so a full queue does not refuse it
            self.metrics.result_cache_hits.inc()
            future = asyncio.get_running_loop().create_future()
            future.set_result(repeated)
            now = time.perf_counter()
            return Pending(request, future, now, started=now, repeated=True)
        admitted = self.scheduler.admitted
        if admitted >= self.config.max_queue_size:
            raise QueueFull(f"{admitted} requests are already admitted (max_queue_size={self.config.max_queue_size})")
        pending = Pending(request, asyncio.get_running_loop().create_future(), time.perf_counter(),
                          on_partial=on_partial, repeat_key=repeat_key)
        self.scheduler.add(pending)
        return pending

    async def result(self, pending: Pending) -> OmniRequestOutput:
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
        if isinstance(result, GenerationResult) and not pending.repeated:
            self.results.put(pending.repeat_key, result)
        return output_from_result(self.model.family, pending.request, result, pending.submitted,
                                  queue_s=pending.started - pending.submitted, repeated=pending.repeated)

    async def load_lora(self, name: str, path: str) -> AdapterInfo:
        """Load a LoRA adapter on every rank (after the batch that runs now); LoraLoadError says why not."""
        if not self.healthy:
            raise EngineNotReady(self.failure)
        self.results.clear()  # the name may now stand for other weights
        return await asyncio.to_thread(self.loras.load, self._group, name, path)

    async def unload_lora(self, name: str) -> None:
        """Requests already admitted with this adapter fail; later ones are refused (404)."""
        if not self.healthy:
            raise EngineNotReady(self.failure)
        self.results.clear()
        await asyncio.to_thread(self.loras.unload, self._group, name)

    def cancel(self, pending: Pending) -> None:
        """Stop an admitted request: dropped if still waiting, else stopped at its next step."""
        self.scheduler.cancel(pending, self._group)

    # lifecycle: the scheduler task ---------------------------------------------------------------
    async def _serve(self) -> None:
        try:
            await self._start_group(restart=False)
        except Exception as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
        finally:
            self._loaded.set()
        while self.state is EngineState.READY:
            await self.scheduler.wake.wait()
            self.scheduler.wake.clear()
            await self.scheduler.run_waiting(self._group, lambda: self.healthy)
            if self._group is not None and not self._group.alive:
                if not self.config.restart_workers:
                    logger.error("not restarting (the supervisor replaces this server)")
                    self._fail(f"a rank died: {self._group.failure}")
                    return
                await self._restart()

    async def _restart(self) -> None:
        old = self._group
        self.state = EngineState.RESTARTING
        self.metrics.worker_restarts.inc()
        logger.warning("restarting the worker group: %s", old.failure)
        await asyncio.to_thread(old.close)
        try:
            await self._start_group(restart=True)
        except Exception as exc:
            self._fail(f"restart failed: {type(exc).__name__}: {exc}")
            return
        self.scheduler.wake.set()  # requests that waited through the restart
        logger.info("worker group restarted")

    async def _start_group(self, restart: bool) -> None:
        """The shared start path (engine.startup) in a thread; READY and on_loaded when it worked."""
        def on_death(reason: str) -> None:  # the group's reader thread: wake the scheduler to restart
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(self.scheduler.wake.set)

        loop = asyncio.get_running_loop()
        model, group = await asyncio.to_thread(start_group, self.config, self.loras, restart, on_death)
        with self._lock:
            if self.state is EngineState.STOPPED:  # shut down while loading
                group.close()
                raise EngineNotReady("stopped while loading")
            self.model, self._group, self.state = model, group, EngineState.READY
        for rank, pid in enumerate(group.pids):
            self.metrics.rank_pid.labels(str(rank)).set(pid)
        self._on_loaded()

    def _fail(self, reason: str) -> None:
        """Loading or a restart failed (or a rank died with restarts off): FAILED, queued work answered 503."""
        if self.state is EngineState.STOPPED:
            return
        self._fatal, self.state = reason, EngineState.FAILED
        logger.error("%s cannot serve: %s", self.config.model, reason)
        self.scheduler.fail_all(EngineNotReady(self.failure))
        self._on_loaded()
