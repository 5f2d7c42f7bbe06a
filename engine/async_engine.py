"""AsyncEngine: the online engine behind the HTTP server.

Loading runs in a background thread so the server can answer /health while it happens;
`generate` awaits the worker group's Future without ever blocking the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable

from configs import SamplingDefaults
from workers import OmniDiffusionSamplingParams

from engine.model_resolver import ResolvedModel, resolve_model
from engine.outputs import OmniRequestOutput, output_from_result
from engine.parallel_config import DiffusionParallelConfig, worker_spec
from engine.sampling import PromptInput, build_request
from engine.worker_group import WorkerGroup

logger = logging.getLogger(__name__)


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


class EngineNotReady(RuntimeError):
    """The model is still loading, failed to load, or the engine was stopped."""


class QueueFull(RuntimeError):
    """More requests are waiting than the engine admits."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: str
    parallel: DiffusionParallelConfig = DiffusionParallelConfig()
    dtype: str = "auto"
    default_overrides: SamplingDefaults = SamplingDefaults()
    max_queue_size: int = 64
    request_timeout_s: float | None = None


class AsyncEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.state = EngineState.LOADING
        self.failure: str | None = None
        self.model: ResolvedModel | None = None
        self._group: WorkerGroup | None = None
        self._in_flight = 0
        self._stop_lock = threading.Lock()

    def load(self, on_done: Callable[[], None] | None = None) -> None:
        """Resolve the model and start the workers (blocking; run it in a thread), then call on_done."""
        try:
            self._load()
        finally:
            if on_done is not None:
                on_done()

    def _load(self) -> None:
        try:
            model = resolve_model(self.config.model)
            model = dataclasses.replace(model, defaults=model.defaults.overridden_by(self.config.default_overrides))
            group = WorkerGroup(worker_spec(model, self.config.parallel, self.config.dtype))
            group.start()
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            self.state = EngineState.FAILED
            logger.error("loading %s failed: %s", self.config.model, self.failure)
            return
        with self._stop_lock:
            if self.state is EngineState.STOPPED:  # stopped while loading
                group.close()
                return
            self.model, self._group, self.state = model, group, EngineState.READY

    def start_loading(self, on_done: Callable[[], None] | None = None) -> threading.Thread:
        thread = threading.Thread(target=self.load, args=(on_done,), name="ditserve-load", daemon=True)
        thread.start()
        return thread

    @property
    def healthy(self) -> bool:
        return self.state is EngineState.READY and self._group is not None and self._group.dead_reason is None

    @property
    def queue_depth(self) -> int:
        return self._in_flight

    async def generate(self, prompt: PromptInput, params: OmniDiffusionSamplingParams) -> OmniRequestOutput:
        """Raises InvalidRequestError, EngineNotReady, QueueFull, TimeoutError, GenerationError, WorkerGroupDied."""
        if not self.healthy:
            raise EngineNotReady(self.not_ready_reason())
        request = build_request(self.model, prompt, params)
        if self._in_flight >= self.config.max_queue_size:
            raise QueueFull(f"{self._in_flight} requests are already queued (max_queue_size={self.config.max_queue_size})")
        started = time.perf_counter()
        self._in_flight += 1
        try:
            future = asyncio.wrap_future(self._group.submit(request))
            result = await asyncio.wait_for(future, timeout=self.config.request_timeout_s)
        finally:
            self._in_flight -= 1
        return output_from_result(request, result, started)

    def not_ready_reason(self) -> str:
        if self.state is EngineState.LOADING:
            return f"model {self.config.model!r} is still loading"
        if self.state is EngineState.FAILED:
            return f"model {self.config.model!r} failed to load: {self.failure}"
        if self._group is not None and self._group.dead_reason:
            return f"the worker group is down: {self._group.dead_reason}"
        return "the engine is stopped"

    def close(self) -> None:
        with self._stop_lock:
            self.state = EngineState.STOPPED
            group, self._group = self._group, None
        if group is not None:
            group.close()
