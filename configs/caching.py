"""Step-caching settings: the server's backend and knobs (`--cache-backend`, `--cache-config`), and
what one batch runs with after its requests' overrides. The mechanism is
workers/parallel/step_cache.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

CACHE_BACKENDS = ("none", "first_block_cache", "taylorseer", "magcache")
_KNOBS = {  # backend -> the --cache-config keys it reads
    "none": set(),
    "first_block_cache": {"threshold", "warmup_steps", "max_cached_steps"},
    "taylorseer": {"cache_interval", "disable_cache_before_step"},
    "magcache": {"threshold", "max_cached_steps", "retention_ratio", "mag_ratios", "calibrate"},
}
# the backends that skip whole blocks on a threshold, which a request's cache_threshold tunes
BLOCK_SKIPPING_BACKENDS = ("first_block_cache", "magcache")
_DEFAULTS = {"magcache": {"threshold": 0.06}}  # where a backend's default differs from the field's

# MagCache's magnitude ratios (the mean ratio of each step's block-stack residual norm to the step
# before) for models whose ratios are known. FLUX.1: the MagCache authors' published calibration
# (the values diffusers ships as FLUX_MAG_RATIOS). builtin/shapes: calibrated here at 30 steps with
# `--cache-config '{"calibrate": true}'` (docs/parallelism.md says how), the mean of four prompts that
# are not among the benchmark's held-out ones.
_FLUX_MAG_RATIOS = (1.0, 1.21094, 1.11719, 1.07812, 1.0625, 1.03906, 1.03125, 1.03906, 1.02344, 1.03125,
                    1.02344, 0.98047, 1.01562, 1.00781, 1.0, 1.00781, 1.0, 1.00781, 1.0, 1.0, 0.99609,
                    0.99609, 0.98047, 0.98828, 0.96484, 0.95703, 0.93359, 0.89062)
_SHAPES_MAG_RATIOS = (1.0, 1.00239, 0.99887, 0.9963, 0.97379, 0.99077, 0.99921, 0.99755, 0.98976, 0.99103,
                      0.98974, 0.99385, 0.99697, 0.99369, 0.99893, 0.99274, 0.99791, 0.99102, 0.99454,
                      0.99384, 0.99545, 0.99704, 0.99355, 0.99643, 0.99571, 0.98795, 0.9905, 0.97759, 0.949,
                      0.89658)
KNOWN_MAG_RATIOS: dict[str, tuple[float, ...]] = {
    "black-forest-labs/FLUX.1-dev": _FLUX_MAG_RATIOS,
    "black-forest-labs/FLUX.1-schnell": _FLUX_MAG_RATIOS,
    "builtin/shapes": _SHAPES_MAG_RATIOS,
}


@dataclass(frozen=True)
class CacheSettings:
    backend: str = "none"
    # first_block_cache: skip the other blocks while the first block's residual changed less than
    # `threshold` (relative L1) since the last full call; after `warmup_steps` full calls, at most
    # `max_cached_steps` skips in a row.
    # magcache: skip every block while the error accumulated from the magnitude ratios since the last
    # full call stays under `threshold`; the first `retention_ratio` of the steps always computed, at
    # most `max_cached_steps` skips in a row; `calibrate` computes every step and logs the ratios.
    threshold: float = 0.1
    warmup_steps: int = 2
    max_cached_steps: int = 3
    retention_ratio: float = 0.2
    mag_ratios: tuple[float, ...] = ()
    calibrate: bool = False
    # taylorseer: the first `disable_cache_before_step` calls computed, then one in `cache_interval`.
    cache_interval: int = 3
    disable_cache_before_step: int = 2
    steps: int = 0  # the batch's step count (magcache stretches its ratios to it); 0: not known yet

    def __post_init__(self) -> None:
        _check_backend(self.backend)
        if not 0 < self.threshold <= 10:
            raise ValueError(f"cache threshold={self.threshold} must be above 0 and at most 10")
        for name in ("warmup_steps", "max_cached_steps", "cache_interval", "disable_cache_before_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"cache {name}={getattr(self, name)} must be at least 1")
        if not 0 <= self.retention_ratio < 1:
            raise ValueError(f"cache retention_ratio={self.retention_ratio} must be in [0, 1)")
        if any(not 0 < ratio < 10 for ratio in self.mag_ratios):
            raise ValueError("cache mag_ratios must be positive numbers (a calibration's output)")

    @classmethod
    def of(cls, backend: str, config: dict[str, Any] | None, model: str | None = None) -> CacheSettings:
        """From --cache-backend and --cache-config; keys the backend does not read are refused. With
        `model`, magcache without `mag_ratios` takes the model's known ratios or is refused."""
        config = config or {}
        _check_backend(backend)
        unknown = set(config) - _KNOBS[backend]
        if unknown:
            raise ValueError(f"--cache-config keys {sorted(unknown)} do not apply to {backend}; it reads "
                             f"{sorted(_KNOBS[backend]) or 'none'}")
        knobs = {**_DEFAULTS.get(backend, {}), **config}
        if "mag_ratios" in knobs:
            knobs["mag_ratios"] = tuple(float(ratio) for ratio in knobs["mag_ratios"])
        settings = cls(backend=backend, **knobs)
        if model is not None and backend == "magcache" and not settings.mag_ratios and not settings.calibrate:
            if model not in KNOWN_MAG_RATIOS:
                raise ValueError(f"magcache needs the magnitude ratios of {model}: serve it once with --cache-config "
                                 "'{\"calibrate\": true}', send a typical request, and pass the logged ratios as "
                                 "\"mag_ratios\"")
            settings = dataclasses.replace(settings, mag_ratios=KNOWN_MAG_RATIOS[model])
        return settings

    @property
    def active(self) -> bool:
        return self.backend != "none"

    def for_request(self, cache: str, threshold: float | None, steps: int) -> CacheSettings:
        """This server's settings under a request's `cache` ("on"/"off") and `cache_threshold`, for
        its step count."""
        if cache == "off" or not self.active:
            return CacheSettings()
        return dataclasses.replace(self, threshold=self.threshold if threshold is None else threshold, steps=steps)


def _check_backend(backend: str) -> None:
    if backend not in CACHE_BACKENDS:
        raise ValueError(f"cache backend {backend!r} is not known; use one of {', '.join(CACHE_BACKENDS)}")
