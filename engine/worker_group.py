"""Starts, watches and stops the rank processes of one model, and matches results to requests.

One queue carries requests to the driver rank; one carries events (ready, results, failures)
back from every rank. A reader thread resolves each request's Future and fails every pending
Future at once when any rank dies, so no caller waits on a group that cannot answer.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing.spawn
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import torch.multiprocessing as mp

from configs import EngineOptions
from engine.errors import WorkerGroupDied, WorkerStartupError
from engine.memory_report import format_size
from workers import (
    AdapterCommand,
    AdapterCommandDone,
    GenerationBatch,
    GenerationFailure,
    GenerationPartial,
    GenerationResult,
    RankChannels,
    WorkerReady,
    WorkerSpec,
    WorkerStartupFailed,
)
from workers.worker_process import run_worker

logger = logging.getLogger(__name__)

_POLL_S = 0.2
_STOP_GRACE_S = 10.0
_spawn_lock = threading.Lock()


@contextlib.contextmanager
def _main_module_left_out() -> Iterator[None]:
    """Spawn ranks without re-running the caller's __main__ in them.

    multiprocessing's spawn re-imports the parent's main script in every child so that objects
    defined there can be unpickled. A rank needs nothing from it (its target and arguments live in
    workers/), and re-running a script without an `if __name__ == "__main__":` guard would make
    each rank start ranks of its own. So the two entries that ask for it are dropped from the
    data the child prepares from, while our ranks start.
    """
    original = multiprocessing.spawn.get_preparation_data

    def preparation_data(name: str) -> dict:
        data = original(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data

    with _spawn_lock:
        multiprocessing.spawn.get_preparation_data = preparation_data
        try:
            yield
        finally:
            multiprocessing.spawn.get_preparation_data = original


class WorkerGroup:
    def __init__(
        self, spec: WorkerSpec, startup_timeout_s: float = EngineOptions.startup_timeout_s,
        on_death: Callable[[str], None] | None = None,
    ):
        self.spec = spec
        self.on_death = on_death
        self.startup_timeout_s = startup_timeout_s
        # A fork server that has imported the rank code once (torch, diffusers, transformers; never
        # CUDA) forks each rank from that clean state: a 4-rank group starts in ~1 s instead of ~7.
        self._context = mp.get_context("forkserver")
        self._context.set_forkserver_preload(["workers.worker_process"])
        self._channels = RankChannels(
            requests=self._context.Queue(), cancels=self._context.Queue(), events=self._context.Queue(),
            doorbells=[self._context.Queue() for _ in range(spec.world_size - 1)],
            fault_flag=self._context.RawValue(ctypes.c_int, 0),
        )
        self._processes: list = []
        self._pending: dict[str, Future] = {}
        self._partial_handlers: dict[str, Callable[[GenerationPartial], None]] = {}
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._stopping = threading.Event()
        self._death: str | None = None  # what the reader thread saw kill the group (`failure` reports it)
        self.parameter_bytes: dict[int, dict[str, int]] = {}  # rank -> component -> bytes

    # lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Spawn every rank and wait until all have loaded; raise WorkerStartupError otherwise."""
        try:
            with _main_module_left_out():
                for rank in range(self.spec.world_size):
                    process = self._context.Process(
                        target=run_worker,
                        args=(rank, self.spec, self._channels, logging.getLogger().getEffectiveLevel()),
                        name=f"ditserve-rank{rank}",
                        daemon=True,
                    )
                    process.start()
                    self._processes.append(process)
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        self._reader = threading.Thread(target=self._read_events, name="ditserve-events", daemon=True)
        self._reader.start()
        logger.info("worker group started: rank pids %s", ", ".join(str(pid) for pid in self.pids))

    def _wait_ready(self) -> None:
        ready: set[int] = set()
        deadline = time.monotonic() + self.startup_timeout_s
        while len(ready) < self.spec.world_size:
            if time.monotonic() > deadline:
                raise WorkerStartupError(
                    f"workers did not load within {self.startup_timeout_s:.0f} s; a slow disk or a large model may "
                    "need more (--startup-timeout, startup_timeout_s)")
            try:
                event = self._channels.events.get(timeout=_POLL_S)
            except queue.Empty:
                dead = self._dead_ranks()
                if dead:
                    codes = ", ".join(f"rank {r}: exit code {self._processes[r].exitcode}" for r in dead)
                    raise WorkerStartupError(
                        f"rank(s) {dead} exited during startup without reporting an error ({codes}); "
                        "their own output on stderr says why"
                    )
                continue
            if isinstance(event, WorkerStartupFailed):
                raise WorkerStartupError(f"rank {event.rank} failed to load the model:\n{event.message}")
            if isinstance(event, WorkerReady):
                ready.add(event.rank)
                self.parameter_bytes[event.rank] = event.parameter_bytes
                parts = ", ".join(
                    f"{name} {format_size(event.parameter_bytes[name])} in {seconds:.1f} s "
                    f"({event.parameter_bytes[name] / 2**30 / max(seconds, 1e-9):.2f} GiB/s)"
                    for name, seconds in event.load_s_by_model.items())
                logger.info("rank %d ready in %.1f s; loaded %s", event.rank, event.load_s, parts)

    def close(self) -> None:
        """Stop every rank: ask politely, then terminate, then kill. Safe to call twice."""
        self._stopping.set()
        if self._processes and self._processes[0].is_alive():
            self._channels.requests.put(None)
        deadline = time.monotonic() + _STOP_GRACE_S
        for process in self._processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        for process in self._processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=2.0)
            if process.is_alive():
                process.kill()
                process.join()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=2.0)
        self._fail_pending(WorkerGroupDied("the worker group was shut down"))
        for process in self._processes:
            process.close()
        self._processes = []
        channels = self._channels
        for channel in (channels.requests, channels.cancels, channels.events, *channels.doorbells):
            channel.cancel_join_thread()  # the ranks are gone: nothing left to flush to them
            channel.close()

    # requests --------------------------------------------------------------------------------
    def submit(self, batch: GenerationBatch,
               on_partial: dict[str, Callable[[GenerationPartial], None]] | None = None) -> list[Future]:
        """One Future per request of the batch, resolved with its GenerationResult or GenerationFailure.
        `on_partial`: request id -> called (on the reader thread) with each preview of that request."""
        return self._send(batch, [request.request_id for request in batch.requests], on_partial or {})

    def control(self, command: AdapterCommand) -> Future:
        """Run a command on the ranks, in order with the batches; resolved with its AdapterCommandDone."""
        return self._send(command, [command.request_id], {})[0]

    def _send(self, item: GenerationBatch | AdapterCommand, ids: list[str],
              on_partial: dict[str, Callable[[GenerationPartial], None]]) -> list[Future]:
        """Queue `item` for the driver with one Future per id, or fail them at once if the group is dead."""
        futures = [Future() for _ in ids]
        with self._lock:
            reason = self.failure
            if reason is not None:
                for future in futures:
                    future.set_exception(WorkerGroupDied(reason))
                return futures
            self._pending.update(zip(ids, futures))
            self._partial_handlers.update(on_partial)
        self._channels.requests.put(item)
        return futures

    def cancel(self, request_id: str) -> None:
        """Ask the driver to stop `request_id` at its next denoising step (or skip it if queued)."""
        if self.alive:
            self._channels.cancels.put(request_id)

    @property
    def failure(self) -> str | None:
        """Why the group cannot serve, or None: checked now, not at the reader thread's next poll."""
        if self._death is not None:
            return self._death
        if self._stopping.is_set():
            return "the worker group is stopped"
        dead = self._dead_ranks()
        return f"rank(s) {dead} exited unexpectedly" if dead else None

    @property
    def alive(self) -> bool:
        return self.failure is None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes]

    # internals -------------------------------------------------------------------------------
    def _dead_ranks(self) -> list[int]:
        return [rank for rank, p in enumerate(self._processes) if not p.is_alive()]

    def _read_events(self) -> None:
        while not self._stopping.is_set():
            try:
                event = self._channels.events.get(timeout=_POLL_S)
            except (ValueError, OSError):  # closed under us by close()
                return
            except queue.Empty:
                reason = None if self._stopping.is_set() else self.failure
                if reason is not None:
                    self._death = reason
                    logger.error("worker group died: %s", self._death)
                    self._fail_pending(WorkerGroupDied(self._death))
                    if self.on_death is not None:
                        self.on_death(self._death)
                    return
                continue
            if isinstance(event, GenerationPartial):
                handler = self._partial_handlers.get(event.request_id)
                if handler is not None:
                    try:
                        handler(event)
                    except Exception:
                        logger.exception("a partial-image handler failed")
            if isinstance(event, (GenerationResult, GenerationFailure, AdapterCommandDone)):
                with self._lock:
                    future = self._pending.pop(event.request_id, None)
                    self._partial_handlers.pop(event.request_id, None)
                if future is not None and not future.done():  # done: cancelled by its caller
                    future.set_result(event)

    def _fail_pending(self, error: Exception) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            self._partial_handlers.clear()
        for future in pending.values():
            if not future.done():
                future.set_exception(error)
