"""How followers learn what to run: the driver broadcasts every sharded module's forward call.

The driver sends (command, (module name, calls, exchange)) as one pickled object and each tensor
with a real broadcast (NCCL or gloo): `calls` holds one (args, kwargs) per CFG group (a text
encoder's forward pre-hook sends one; the DiT's dispatcher, cfg_parallel, one or two), so followers
run the same sharded forward on the same inputs. Every decision (next step, stop) is taken on the
driver and arrives as a command, LoRA adapter changes too (ADAPTERS: put, drop, activate; see
workers/lora/layers.py).

Collectives have a timeout, so followers must never wait in one for long: between batches (and
while rank 0 is still loading) they wait on a doorbell, a plain queue with no timeout, which the
driver rings when a batch starts; it sends IDLE when the batch is done.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from workers.parallel import parallel_state

logger = logging.getLogger(__name__)

FORWARD, ADAPTERS, CACHE, IDLE, STOP = "forward", "adapters", "cache", "idle", "stop"
# Held by a driver thread from a broadcast until its local part has run: with continuous batching
# several pipeline calls run on the driver at once, and the followers must see whole calls, in order.
RANKS = threading.RLock()


@contextlib.contextmanager
def on_ranks() -> Iterator[None]:
    """Driver side: hold RANKS for a broadcast and this rank's part of the call. An error inside (the
    followers may be waiting in one of its collectives) is reported to every rank; one outside, in
    the driver's own work between calls, concerns its pipeline call alone."""
    with RANKS:
        try:
            yield
        except Exception as exc:
            if parallel_state.layout().world_size > 1 and not isinstance(exc, parallel_state.CollectivesAborted):
                parallel_state.report_fault(exc)
            raise


def everywhere(command: str, tree: Any, here: Callable[[], Any]) -> Any:
    """Driver side: send `command` and its tree to the followers (when there are any), then run
    `here`, this rank's part, all inside on_ranks(); returns what `here` returns."""
    with on_ranks():
        if parallel_state.layout().world_size > 1:
            send(command, tree)
        return here()
_SETTINGS = (ADAPTERS, CACHE)  # commands a follower applies with handlers[command](tree)
_DOORBELL_POLL_S = 1.0


@dataclass(frozen=True)
class _TensorSlot:
    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def _strip_tensors(tree: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(tree, torch.Tensor):
        tensors.append(tree)
        return _TensorSlot(len(tensors) - 1, tuple(tree.shape), tree.dtype)
    if isinstance(tree, (list, tuple)):
        return type(tree)(_strip_tensors(item, tensors) for item in tree)
    if isinstance(tree, dict):
        return {key: _strip_tensors(value, tensors) for key, value in tree.items()}
    return tree


def _fill_tensors(tree: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(tree, _TensorSlot):
        return tensors[tree.index]
    if isinstance(tree, (list, tuple)):
        return type(tree)(_fill_tensors(item, tensors) for item in tree)
    if isinstance(tree, dict):
        return {key: _fill_tensors(value, tensors) for key, value in tree.items()}
    return tree


def _broadcast_tensor(tensor: torch.Tensor) -> None:
    # gloo has no bool all-reduce/broadcast: move bools as bytes.
    parallel_state.count("broadcast", tensor.nbytes)
    with parallel_state.collective(abortable=False):
        dist.broadcast(tensor.view(torch.uint8) if tensor.dtype == torch.bool else tensor, src=0)


def _broadcast_object(box: list) -> None:
    with parallel_state.collective(abortable=False):
        dist.broadcast_object_list(box, src=0)


def send(command: str, tree: Any = None) -> None:
    """Driver side: broadcast a command and its argument tree."""
    tensors: list[torch.Tensor] = []
    skeleton = _strip_tensors(tree, tensors)
    _broadcast_object([(command, skeleton)])
    device = parallel_state.device()
    for tensor in tensors:
        _broadcast_tensor(tensor.detach().to(device).contiguous())


def receive() -> tuple[str, Any]:
    """Follower side: the next command and its argument tree, tensors on this rank's device."""
    box: list[Any] = [None]
    _broadcast_object(box)
    command, skeleton = box[0]
    slots: list[_TensorSlot] = []
    _strip_slots(skeleton, slots)
    tensors = []
    for slot in sorted(slots, key=lambda s: s.index):
        tensor = torch.empty(slot.shape, dtype=slot.dtype, device=parallel_state.device())
        _broadcast_tensor(tensor)
        tensors.append(tensor)
    return command, _fill_tensors(skeleton, tensors)


def _strip_slots(tree: Any, slots: list[_TensorSlot]) -> None:
    if isinstance(tree, _TensorSlot):
        slots.append(tree)
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            _strip_slots(item, slots)
    elif isinstance(tree, dict):
        for value in tree.values():
            _strip_slots(value, slots)


def install_driver_hook(name: str, module: nn.Module) -> None:
    """Make every forward call of the driver's module `name` (a text encoder) first reach the followers."""

    def broadcast_inputs(module: nn.Module, args: tuple, kwargs: dict) -> None:
        send(FORWARD, (name, [(args, kwargs)], False))

    module.register_forward_pre_hook(broadcast_inputs, with_kwargs=True)


def end_batch() -> str | None:
    """Driver side, after every batch: send the followers back to their doorbells, and settle the
    batch with them (parallel_state.settle): the first rank's error if any rank failed in it."""
    if parallel_state.layout().world_size > 1:
        send(IDLE)
    return parallel_state.settle()


def ring(doorbells: list) -> None:
    """Driver side: wake every follower before the first collective of a batch (or of the stop)."""
    for doorbell in doorbells:
        doorbell.put(True)


def _wait_for_the_doorbell(doorbell, engine_alive: Callable[[], bool]) -> bool:
    """Untimed wait (no collective); False once the engine's process is gone."""
    while True:
        try:
            return doorbell.get(timeout=_DOORBELL_POLL_S)
        except queue.Empty:
            if not engine_alive():
                return False


@torch.inference_mode()
def follow(handlers: dict[str, Callable[[list, bool], Any]], doorbell, engine_alive: Callable[[], bool]) -> None:
    """Follower loop: after each ring, run every broadcast forward with the named handler until the
    driver says idle (settle the batch, wait for the next ring) or stop. A rank without a handler for
    a name (a text encoder it does not hold) only receives the call. handlers[ADAPTERS] takes adapter
    commands, handlers[CACHE] a batch's step-cache settings. An error in a handler fails the batch,
    not the rank: it is reported to every rank (parallel_state.report_fault), this rank goes on
    receiving, and the batch's settle tells all."""
    while _wait_for_the_doorbell(doorbell, engine_alive):
        while True:
            command, tree = receive()
            if command == STOP:
                return
            if command == IDLE:
                parallel_state.settle()
                break
            try:
                if command in _SETTINGS:
                    handlers[command](tree)
                    continue
                name, calls, exchange, *branches = tree
                if name in handlers:
                    handlers[name](calls, exchange, *branches)
            except Exception as exc:  # noqa: BLE001 - the batch fails on every rank; this rank serves on
                if parallel_state.group_broken():
                    raise
                if not isinstance(exc, parallel_state.CollectivesAborted):
                    logger.exception("a broadcast %s call failed on this rank", command)
                parallel_state.report_fault(exc)
