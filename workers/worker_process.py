"""Entry point of every rank process: set up the device, load this rank's part, serve commands.

Every rank loads its shard of the DiT and of each text encoder that has a TP plan. Rank 0 (driver)
loads the rest of the diffusers pipeline around its shards and takes requests from the engine;
ranks 1..N-1 (followers) run what the driver broadcasts.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import queue
import signal
import sys
import threading
import time
import traceback

import diffusers
import torch
import tqdm
import transformers

from configs import load_family
from workers import testing_hooks
from workers.lora.adapter_library import AdapterLibrary, apply_command
from workers.lora.layers import AdapterError, AdapterStore
from workers.messages import (
    AdapterAction,
    AdapterCommand,
    AdapterCommandDone,
    FailureKind,
    GenerationBatch,
    GenerationFailure,
    GenerationResult,
    RankChannels,
    WorkerReady,
    WorkerSpec,
    WorkerStartupFailed,
)
from workers.offload import home_device, offload
from workers.parallel import forward_broadcast, parallel_state
from workers.parallel.cfg_parallel import DitExecutor, follower_handlers, install_dispatcher
from workers.parallel.compiled_blocks import use_cache_dir
from workers.parallel.sharded_loading import (
    load_component_shard,
    load_whole_model,
    sharded_components,
    unsharded_models,
)
from workers.parallel.step_merger import SharedForwardFailed, StepMerger
from workers.pipeline_runner import BatchCancelled, PipelineRunner, load_pipeline
from workers.prompt_cache import PromptCache
from workers.quantization.schemes import Quantization

logger = logging.getLogger(__name__)

_POLL_S = 1.0


def run_worker(rank: int, spec: WorkerSpec, channels: RankChannels, log_level: int = logging.WARNING) -> None:
    """Process target (started by the fork server): report ready or the startup error, then serve until
    told to stop. Rank 0 logs at the engine's level; the others, which repeat its work, warnings only."""
    events = channels.events
    started = time.perf_counter()
    logging.basicConfig(level=log_level if rank == 0 else max(log_level, logging.WARNING),
                        format=f"%(asctime)s %(levelname)s %(name)s (rank {rank}): %(message)s")
    _take_signals_from_the_engine()
    testing_hooks.shrink_edit_conditions()
    try:
        _configure_device(rank, spec)
        parallel_state.initialize(rank, spec.layout, spec.device_type, spec.master_port,
                                  fault_flag=channels.fault_flag,
                                  sub_group_sizes=tuple(s for s in spec.text_encoder_tp_sizes.values() if s > 1))
        family = load_family(spec.family_name)
        shards, whole, load_s = _load_models(rank, spec)
        if spec.compiled:
            use_cache_dir(spec.compile_cache_dir)
        executor = DitExecutor(shards["transformer"], family.sequence_parallel, spec.compiled)
        components = {**shards, **whole}
        if rank == 0:
            for name in shards.keys() - {"transformer"}:  # the text-encoder shards the TP group runs together
                forward_broadcast.install_driver_hook(name, shards[name])
            dispatcher = install_dispatcher("transformer", shards["transformer"], executor, family.cfg_parallel)
            continuous = spec.scheduling == "continuous"
            if continuous:
                dispatcher.merger = StepMerger(dispatcher.run_on_ranks, executor.signature,
                                               family.per_sample_arguments, spec.max_batch_size)
            pipeline = load_pipeline(spec, **components)
            components = pipeline.components
            store = AdapterStore(components, getattr(torch, spec.dtype), parallel_state.device())
            adapters = AdapterLibrary(store, type(pipeline), spec.max_loras, spec.max_lora_rank)
            runner = PipelineRunner(pipeline, dispatcher, family, adapters, spec.cache,
                                    PromptCache(spec.prompt_cache_bytes), concurrent=continuous)
    except BaseException:
        events.put(WorkerStartupFailed(rank=rank, message=traceback.format_exc()))
        return
    events.put(WorkerReady(rank=rank, load_s=time.perf_counter() - started, parameter_bytes=_bytes_held(components),
                           load_s_by_model=load_s))
    if rank == 0:
        _drive(runner, channels, CancelledIds(channels.cancels))
        if spec.world_size > 1 and not parallel_state.group_broken():
            forward_broadcast.ring(channels.doorbells)
            forward_broadcast.send(forward_broadcast.STOP)
    else:
        text_encoders = {name: module for name, module in shards.items() if name != "transformer"}
        handlers = follower_handlers("transformer", executor, text_encoders)
        store = AdapterStore(shards, getattr(torch, spec.dtype), parallel_state.device())
        handlers[forward_broadcast.ADAPTERS] = lambda command: apply_command(store, command)
        forward_broadcast.follow(handlers, channels.doorbells[rank - 1], _parent_alive)
    parallel_state.shutdown()


Models = dict[str, torch.nn.Module]


def _load_models(rank: int, spec: WorkerSpec) -> tuple[Models, Models, dict[str, float]]:
    """This rank's shards, the models it holds whole, and the seconds each took to load. Shards:
    the DiT's, and on the driver's TP group (the only ranks that run them) at tensor-parallel size
    > 1, the text encoders'. Whole, on rank 0: every other model of the pipeline (the VAE, text
    encoders without a TP plan or at TP=1). Offloaded models load straight to their home device."""
    dummy = spec.load_format == "dummy"
    family = load_family(spec.family_name)
    quantization = Quantization.parse(spec.quantization, family.quantization)
    components = sharded_components(family, spec.model_path)
    tp_rank, tp_size = parallel_state.rank_in("tp"), parallel_state.size_of("tp")
    in_driver_group = parallel_state.rank_in("cfg") == 0 and parallel_state.rank_in("ulysses") == 0
    sizes = {c.name: spec.text_encoder_tp_sizes.get(c.name, tp_size) for c in components}
    components = [c for c in components if c.name == "transformer" or (in_driver_group and tp_rank < sizes[c.name] and (
        sizes[c.name] > 1 or quantization is not None and quantization.applies_to(c.name)))]  # quantized: loaded here
    device, dtype = parallel_state.device(), getattr(torch, spec.dtype)
    shards, whole, seconds = {}, {}, {}
    for component in components:
        started = time.perf_counter()
        home = home_device(component.name, spec.offload, device)
        size = sizes[component.name]
        shards[component.name] = load_component_shard(
            component, spec.model_path / component.name, tp_rank, size, home, dtype, dummy, quantization,
            spec.transformer_file if component.name == "transformer" else None,
            "tp" if size == tp_size else parallel_state.sub_group_name(size))
        seconds[component.name] = time.perf_counter() - started
    if rank == 0:
        for name, (library, class_name) in unsharded_models(spec.model_path, set(shards)).items():
            started = time.perf_counter()
            home = home_device(name, spec.offload, device)
            whole[name] = load_whole_model(library, class_name, spec.model_path / name, home, dtype, dummy)
            seconds[name] = time.perf_counter() - started
    for name, model in {**shards, **whole}.items():
        home = home_device(name, spec.offload, device)
        if home != device:
            offload(model, home, device)
    return shards, whole, seconds


def _bytes_held(components: dict) -> dict[str, int]:
    return {
        name: sum(t.nbytes for t in (*module.parameters(), *module.buffers()))
        for name, module in components.items()
        if isinstance(module, torch.nn.Module)
    }


def _take_signals_from_the_engine() -> None:
    """Ctrl-C in a terminal reaches the whole process group, but the engine decides what stops, so
    a rank ignores SIGINT. SIGTERM exits through Python, so what the process holds is released.

    tqdm (used by the loaders) would make a multiprocessing lock, a named semaphore that a killed
    rank leaks; one process needs only a thread lock.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    tqdm.tqdm.set_lock(threading.RLock())


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


def _adapter_command(adapters: AdapterLibrary, command: AdapterCommand) -> AdapterCommandDone:
    try:
        if command.action is AdapterAction.UNLOAD:
            adapters.unload(command.name)
            return AdapterCommandDone(command.request_id)
        adapter = adapters.load(command.name, command.path)
    except AdapterError as exc:
        return AdapterCommandDone(command.request_id, error=str(exc), error_code=exc.code)
    except Exception as exc:  # noqa: BLE001 - the driver keeps serving; the caller gets the reason
        logger.exception("LoRA adapter %s failed", command.action.value)
        return AdapterCommandDone(command.request_id, error=f"{type(exc).__name__}: {exc}",
                                  error_code="lora_load_failed")
    return AdapterCommandDone(command.request_id, adapter)


class CancelledIds:
    """Request ids the engine cancelled, read from its queue without blocking.

    Only the last few hundred are remembered: a cancel that arrives after its request finished
    is never looked up again.
    """

    _REMEMBERED = 512

    def __init__(self, cancels):
        self._cancels = cancels
        self._ids: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lock = threading.Lock()  # asked from every running pipeline call's thread

    def __contains__(self, request_id: str) -> bool:
        with self._lock:
            return self._contains(request_id)

    def _contains(self, request_id: str) -> bool:
        while True:
            try:
                self._ids[self._cancels.get_nowait()] = None
            except queue.Empty:
                break
        while len(self._ids) > self._REMEMBERED:
            self._ids.popitem(last=False)
        return request_id in self._ids


def _drive(runner: PipelineRunner, channels: RankChannels, cancelled: CancelledIds) -> None:
    """Driver loop: batches and adapter commands from the engine until None (stop), run one at a
    time (request scheduling) or each in a thread of its own (continuous: `runner.concurrent`).

    Cancellation is decided here, on rank 0 only, between denoising steps: followers simply never
    receive the next forward call, so the ranks cannot diverge. Followers are rung awake for work and
    sent back to their doorbell after it, so they never idle inside a collective. A stop, an adapter
    command or a fault first lets the running calls end; an adapter command then runs alone.
    """
    calls = _Session() if runner.concurrent else _OneAtATime()
    while True:
        calls.tidy()
        if parallel_state.group_broken():  # a peer rank is gone: exit so the engine sees the group is dead
            return
        item = _next_item(channels, calls.poll_s)
        if item is _NOTHING:
            if calls.idle and not _parent_alive():
                return
            continue
        if item is None or isinstance(item, AdapterCommand) or parallel_state.faulted():
            calls.end()
        if item is None:
            return
        if isinstance(item, AdapterCommand):
            _run_command(runner, channels, item)
            continue
        live = _not_cancelled(item.requests, cancelled, channels.events)
        if live:
            calls.start(runner, live, channels, cancelled)


class _OneAtATime:
    """Request scheduling: each batch runs to its end on the driver's thread, the followers rung for it."""

    poll_s, idle = _POLL_S, True

    def tidy(self) -> None:
        pass

    def end(self) -> None:
        pass

    def start(self, runner: PipelineRunner, live: list, channels: RankChannels, cancelled: CancelledIds) -> None:
        for outcome in _run_batch(runner, live, channels, cancelled):
            channels.events.put(outcome)


class _Session:
    """Continuous scheduling: every batch runs in a thread of its own as soon as it arrives (the
    engine bounds how many), and their DiT calls merge step by step (StepMerger).

    The followers are rung when the first call starts and sent back to their doorbells when the last
    one ends (a session). After a fault the session's running calls fail at their next collective;
    new batches wait until it has ended and been settled, so they start on healthy ranks."""

    def __init__(self) -> None:
        self.running: list[threading.Thread] = []
        self.open = False

    @property
    def poll_s(self) -> float:
        return 0.02 if self.running else _POLL_S

    @property
    def idle(self) -> bool:
        return not self.running

    def tidy(self) -> None:
        """Forget the calls that ended; end the session when none is left."""
        self.running[:] = [thread for thread in self.running if thread.is_alive()]
        if self.open and not self.running:
            self.end()

    def end(self) -> None:
        """Wait for the running calls, then send the followers back to their doorbells."""
        for thread in self.running:
            thread.join()
        self.running.clear()
        if self.open and not parallel_state.group_broken():
            fault = forward_broadcast.end_batch()
            if fault is not None:
                logger.warning("a fault ended the running requests: %s", fault)
        self.open = False

    def start(self, runner: PipelineRunner, live: list, channels: RankChannels, cancelled: CancelledIds) -> None:
        if not self.open:
            forward_broadcast.ring(channels.doorbells)
            self.open = True
        thread = threading.Thread(target=_run_and_report, args=(runner, live, channels, cancelled),
                                  name=f"ditserve-call-{live[0].request_id[:8]}", daemon=True)
        thread.start()
        self.running.append(thread)


_NOTHING = object()


def _next_item(channels: RankChannels, timeout_s: float):
    """The engine's next batch, command or None (stop); _NOTHING when none came in time."""
    try:
        return channels.requests.get(timeout=timeout_s)
    except queue.Empty:
        return _NOTHING


def _not_cancelled(requests: list, cancelled: CancelledIds, events) -> list:
    live = []
    for request in requests:
        if request.request_id in cancelled:
            events.put(GenerationFailure(request.request_id, "cancelled before it started", FailureKind.CANCELLED))
        else:
            live.append(request)
    return live


def _run_command(runner: PipelineRunner, channels: RankChannels, command: AdapterCommand) -> None:
    forward_broadcast.ring(channels.doorbells)
    done = _adapter_command(runner.adapters, command)
    runner.prompt_cache.clear()  # an adapter may change what a text encoder gives
    fault = forward_broadcast.end_batch()
    if fault is not None and done.error is None:
        done = AdapterCommandDone(command.request_id, error=fault, error_code="lora_load_failed")
    channels.events.put(done)


def _run_and_report(runner: PipelineRunner, live: list, channels: RankChannels, cancelled: CancelledIds) -> None:
    """A continuous-scheduling thread: one pipeline call, its outcomes sent as soon as it ends. An
    error that reached the other ranks was reported to them where it happened (on_ranks)."""
    results, error, kind = _run_call(runner, live, channels, cancelled)
    outcomes = results if error is None else _failures(live, error, kind)
    for outcome in outcomes:
        channels.events.put(outcome)


def _run_call(runner: PipelineRunner, live: list, channels: RankChannels, cancelled: CancelledIds,
              report_faults: bool = False) -> tuple[list[GenerationResult], str | None, FailureKind]:
    """One pipeline call: its results, or why it failed and how. `report_faults`: an error is reported
    to every rank (request scheduling: the batch is all the ranks run)."""
    try:
        return list(runner.run(GenerationBatch(live), lambda: all(r.request_id in cancelled for r in live),
                               channels.events.put)), None, FailureKind.PIPELINE_ERROR
    except BatchCancelled:
        return [], "cancelled", FailureKind.CANCELLED
    except Exception as exc:
        if not isinstance(exc, parallel_state.CollectivesAborted):
            logger.exception("batch of %d request(s) failed", len(live))
        kind = FailureKind.GROUP_BROKEN if parallel_state.group_broken() else FailureKind.PIPELINE_ERROR
        if runner.concurrent and isinstance(exc, (parallel_state.CollectivesAborted, SharedForwardFailed)):
            kind = FailureKind.INTERRUPTED  # maybe another call's fault: run again alone to tell
        if report_faults and kind is FailureKind.PIPELINE_ERROR and parallel_state.layout().world_size > 1:
            parallel_state.report_fault(exc)
        return [], f"{type(exc).__name__}: {exc}", kind


def _failures(live: list, error: str, kind: FailureKind) -> list[GenerationFailure]:
    return [GenerationFailure(request_id=r.request_id, message=error, kind=kind) for r in live]


def _run_batch(runner: PipelineRunner, live: list, channels: RankChannels,
               cancelled: CancelledIds) -> list[GenerationResult | GenerationFailure]:
    """One batch on every rank; its results, or one failure per request when any rank failed in it.

    An error on any rank fails only this batch: the rank that raised reports it, every rank's
    collectives stop waiting, and all ranks meet at the batch's end in step for the
    next one (forward_broadcast.end_batch). Only a collective that failed outright (a peer died)
    leaves the group broken."""
    forward_broadcast.ring(channels.doorbells)
    results, error, kind = _run_call(runner, live, channels, cancelled, report_faults=True)
    if kind is not FailureKind.GROUP_BROKEN:
        fault = forward_broadcast.end_batch()
        if fault is not None and kind is FailureKind.PIPELINE_ERROR:
            error = fault
    return results if error is None else _failures(live, error, kind)
