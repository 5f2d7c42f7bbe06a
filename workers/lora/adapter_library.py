"""The driver's LoRA adapters: which are registered, which are resident on every rank, which are active.

Every change is made on the driver's own AdapterStore and broadcast to the followers (forward
broadcast's ADAPTERS command), so all ranks hold the same adapters in the same order. At most
`max_loras` adapters are resident; the least recently used one not needed now is dropped, and read
from its file again when a request asks for it. Switching adapters between batches only changes
which slices each layer adds: base weights are never touched.
"""

from __future__ import annotations

import collections
import enum
import logging

from workers.lora.layers import Active, AdapterError, AdapterStore, LowRank, ModuleKey, read_adapter
from workers.messages import AdapterInfo
from workers.parallel import forward_broadcast

logger = logging.getLogger(__name__)


class StoreAction(enum.Enum):
    """What the driver tells every rank's AdapterStore (the followers get it by broadcast)."""

    PUT = "put"
    DROP = "drop"
    ACTIVATE = "activate"


class AdapterLibrary:
    def __init__(self, store: AdapterStore, pipeline_class: type, max_loras: int, max_rank: int):
        self.store = store
        self._pipeline_class = pipeline_class
        self.max_loras, self.max_rank = max_loras, max_rank
        self.registered: dict[str, str] = {}  # name -> path
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()  # resident, oldest first

    def load(self, name: str, path: str) -> AdapterInfo:
        """Read, check and make resident; AdapterError if the file does not fit this model."""
        if name in self.registered:
            raise AdapterError(f"a LoRA adapter named {name!r} is already loaded", "lora_already_loaded")
        pairs = self._read(path)
        self._make_room(keep=())
        self._put(name, pairs)
        self.registered[name] = path
        components = tuple(sorted({component for component, _ in pairs}))
        info = AdapterInfo(name, path, max(p.down.shape[0] for p in pairs.values()), components,
                           self.store.nbytes(name))
        logger.info("LoRA adapter %r loaded from %s: rank %d, adapts %s", name, path, info.rank, ", ".join(components))
        return info

    def unload(self, name: str) -> None:
        if name not in self.registered:
            raise AdapterError(f"no LoRA adapter named {name!r} is loaded", "lora_not_found")
        del self.registered[name]
        if name in self._recent:
            self._drop(name)

    def activate(self, active: Active) -> None:
        """Make exactly `active` ((name, scale), in order) add to the layers, loading any that were dropped."""
        missing = [name for name, _ in active if name not in self.registered]
        if missing:
            raise AdapterError(f"LoRA adapter(s) {missing} are not loaded (unloaded while the request waited?)",
                               "lora_not_found")
        needed = tuple(name for name, _ in active)
        for name in needed:
            if name not in self._recent:
                self._make_room(keep=needed)
                self._put(name, self._read(self.registered[name]))
            self._recent.move_to_end(name)
        if active != self.store.active:
            self._send((StoreAction.ACTIVATE, active))

    def _read(self, path: str) -> dict[ModuleKey, LowRank]:
        return read_adapter(path, self._pipeline_class, self.store.components, self.max_rank)

    def _make_room(self, keep: tuple[str, ...]) -> None:
        for name in list(self._recent):
            if len(self._recent) < self.max_loras:
                return
            if name not in keep:
                logger.info("LoRA adapter %r dropped from the ranks (max_loras=%d); it reloads on use",
                            name, self.max_loras)
                self._drop(name)

    def _put(self, name: str, pairs: dict[ModuleKey, LowRank]) -> None:
        self._send((StoreAction.PUT, name, {key: (pair.down, pair.up) for key, pair in pairs.items()}))
        self._recent[name] = None

    def _drop(self, name: str) -> None:
        self._send((StoreAction.DROP, name))
        del self._recent[name]

    def _send(self, command: tuple) -> None:
        """Apply on this rank and, with followers, broadcast (they must be awake: rung)."""
        forward_broadcast.everywhere(forward_broadcast.ADAPTERS, command, lambda: apply_command(self.store, command))


def apply_command(store: AdapterStore, command: tuple) -> None:
    """(PUT, name, {key: (down, up)}), (DROP, name) or (ACTIVATE, active), on one rank's store."""
    action, *arguments = command
    if action is StoreAction.PUT:
        name, pairs = arguments
        store.put(name, {key: LowRank(down, up) for key, (down, up) in pairs.items()})
    elif action is StoreAction.DROP:
        store.drop(*arguments)
    else:
        store.activate(*arguments)
