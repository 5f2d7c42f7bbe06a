"""The LoRA adapters an engine serves: loading them on a worker group, and checking what requests ask for.

Adapters are named when loaded (`--lora-modules name=path`, `POST /v1/load_lora_adapter`,
`Omni(lora_modules=...)`) and requests ask for them by name, with a scale. The ranks hold the
weights (workers/lora/layers.py); this registry holds the names, so a request for an unknown adapter is
refused before it waits in the queue, and a restarted worker group gets the same adapters back.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from configs import MAX_LORA_SCALE, LoraAdapter
from engine.errors import InvalidRequestError, LoraLoadError, LoraNotFound
from engine.worker_group import WorkerGroup
from workers import AdapterAction, AdapterCommand, AdapterCommandDone, AdapterInfo


def parse_lora_modules(items: list[str]) -> dict[str, str]:
    """`name=path` items (the command line's --lora-modules) as {name: path}."""
    modules = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules takes name=path items, got {item!r}")
        if name in modules:
            raise ValueError(f"--lora-modules names {name!r} twice")
        modules[name] = path
    return modules


class LoraRegistry:
    def __init__(self, max_loras: int, reserved_names: set[str] = frozenset()):
        if max_loras < 1:
            raise ValueError(f"max_loras={max_loras} must be at least 1")
        self.max_loras = max_loras
        self.reserved_names = set(reserved_names)  # the base model's own names (the server adds its served name)
        self.adapters: dict[str, AdapterInfo] = {}

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def load(self, group: WorkerGroup, name: str, path: str) -> AdapterInfo:
        """Blocking: read and place the adapter on every rank; LoraLoadError says why not."""
        if name in self.reserved_names:
            raise LoraLoadError(f"{name!r} is the base model's name; give the adapter another", "invalid_lora_name",
                                "lora_name")
        if name in self.adapters:
            raise LoraLoadError(f"a LoRA adapter named {name!r} is already loaded", "lora_already_loaded", "lora_name")
        done = self._run(group, AdapterCommand(str(uuid.uuid4()), AdapterAction.LOAD, name, path))
        if done.error is not None:
            raise LoraLoadError(done.error, done.error_code)
        self.adapters[name] = done.adapter
        return done.adapter

    def unload(self, group: WorkerGroup, name: str) -> None:
        if name not in self.adapters:
            raise LoraNotFound(f"no LoRA adapter named {name!r} is loaded; loaded: {self.names}", "lora_name")
        done = self._run(group, AdapterCommand(str(uuid.uuid4()), AdapterAction.UNLOAD, name))
        if done.error is not None:
            raise LoraLoadError(done.error, done.error_code)
        del self.adapters[name]

    def load_all(self, group: WorkerGroup, modules: Mapping[str, str]) -> None:
        """Load each; a failure names the adapter (a start-up or restart error)."""
        for name, path in modules.items():
            try:
                self.load(group, name, path)
            except LoraLoadError as exc:
                raise LoraLoadError(f"LoRA adapter {name}={path}: {exc}", exc.code) from None

    def reload_into(self, group: WorkerGroup) -> None:
        """After a restart: the same adapters, from the same files."""
        loaded, self.adapters = self.adapters, {}
        self.load_all(group, {name: adapter.path for name, adapter in loaded.items()})

    def resolve(self, asked: list | None) -> tuple[tuple[str, float], ...]:
        """What a request's `loras` asks for, as (name, scale) pairs the ranks run; raises LoraNotFound
        for a name that is not loaded and InvalidRequestError for a bad scale or too many adapters."""
        pairs = tuple(_as_pair(item) for item in asked or ())
        names = [name for name, _ in pairs]
        unknown = [name for name in names if name not in self.adapters]
        if unknown:
            raise LoraNotFound(f"LoRA adapter {unknown[0]!r} is not loaded; served: {self.names or 'none'}", "model")
        if len(set(names)) < len(names):
            raise InvalidRequestError(f"loras names an adapter twice: {names}", "loras")
        if len(pairs) > self.max_loras:
            raise InvalidRequestError(
                f"a request may use at most max_loras={self.max_loras} adapters at once; it asked for {len(pairs)}",
                "loras")
        for name, scale in pairs:
            if not -MAX_LORA_SCALE <= scale <= MAX_LORA_SCALE:
                raise InvalidRequestError(f"scale={scale} of LoRA adapter {name!r} must be between "
                                          f"{-MAX_LORA_SCALE:g} and {MAX_LORA_SCALE:g}", "loras")
        return tuple(pair for pair in pairs if pair[1] != 0)

    @staticmethod
    def _run(group: WorkerGroup, command: AdapterCommand) -> AdapterCommandDone:
        return group.control(command).result()


def _as_pair(item) -> tuple[str, float]:
    """A LoraAdapter, {"name", "scale"} or a bare name."""
    if isinstance(item, str):
        return item, 1.0
    if isinstance(item, Mapping) and "name" in item and set(item) <= {"name", "scale"}:
        item = LoraAdapter(**item)
    if not isinstance(item, LoraAdapter) or not isinstance(item.name, str):
        raise InvalidRequestError(f"loras items are LoraAdapter(name, scale), got {item!r:.80}", "loras")
    return item.name, float(item.scale)
