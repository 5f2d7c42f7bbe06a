"""Step-caching settings: the server's backend and knobs (`--cache-backend`, `--cache-config`), and
what one batch runs with after its requests' overrides. The mechanism is workers/step_cache.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

CACHE_BACKENDS = ("none", "first_block_cache", "taylorseer")
_KNOBS = {  # backend -> the --cache-config keys it reads
    "none": set(),
    "first_block_cache": {"threshold", "warmup_steps", "max_cached_steps"},
    "taylorseer": {"cache_interval", "disable_cache_before_step"},
}


@dataclass(frozen=True)
class CacheSettings:
    backend: str = "none"
    # first_block_cache: skip the other blocks while the first block's residual changed less than
    # `threshold` (relative L1) since the last full call; after `warmup_steps` full calls, at most
    # `max_cached_steps` skips in a row.
    threshold: float = 0.1
    warmup_steps: int = 2
    max_cached_steps: int = 3
    # taylorseer: the first `disable_cache_before_step` calls computed, then one in `cache_interval`.
    cache_interval: int = 3
    disable_cache_before_step: int = 2

    def __post_init__(self) -> None:
        if self.backend not in CACHE_BACKENDS:
            raise ValueError(f"cache backend {self.backend!r} is not known; use one of {', '.join(CACHE_BACKENDS)}")
        if not 0 < self.threshold <= 10:
            raise ValueError(f"cache threshold={self.threshold} must be above 0 and at most 10")
        for name in ("warmup_steps", "max_cached_steps", "cache_interval", "disable_cache_before_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"cache {name}={getattr(self, name)} must be at least 1")

    @classmethod
    def of(cls, backend: str, config: dict[str, Any] | None) -> CacheSettings:
        """From --cache-backend and --cache-config; keys the backend does not read are refused."""
        config = config or {}
        if backend not in CACHE_BACKENDS:
            raise ValueError(f"cache backend {backend!r} is not known; use one of {', '.join(CACHE_BACKENDS)}")
        unknown = set(config) - _KNOBS[backend]
        if unknown:
            raise ValueError(f"--cache-config keys {sorted(unknown)} do not apply to {backend}; it reads "
                             f"{sorted(_KNOBS[backend]) or 'none'}")
        return cls(backend=backend, **config)

    @property
    def active(self) -> bool:
        return self.backend != "none"

    def for_request(self, cache: str, threshold: float | None) -> CacheSettings:
        """This server's settings under a request's `cache` ("on"/"off") and `cache_threshold`."""
        if cache == "off" or not self.active:
            return CacheSettings()
        return self if threshold is None else dataclasses.replace(self, threshold=threshold)
