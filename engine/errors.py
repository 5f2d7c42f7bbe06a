"""Every error the engine raises to its callers (Omni users and the HTTP layer), in one place.

The HTTP layer maps each to a status in server/errors.py; Omni users catch them by type.
"""

from __future__ import annotations

from workers import FailureKind, GenerationFailure


class EngineError(Exception):
    """Base of the engine's errors."""


class InvalidRequestError(EngineError, ValueError):
    """A request value that cannot work; `param` names it (engine names, e.g. "height")."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class LoraNotFound(InvalidRequestError):
    """A request or an unload names a LoRA adapter that is not loaded."""


class LoraLoadError(InvalidRequestError):
    """A LoRA adapter could not be loaded; `code` says why ("lora_rank_too_high", "invalid_lora_adapter", ...)."""

    def __init__(self, message: str, code: str, param: str = "lora_path"):
        super().__init__(message, param)
        self.code = code


class EngineNotReady(EngineError):
    """The model is loading or restarting, failed to load, or the engine was stopped."""


class QueueFull(EngineError):
    """More requests are admitted than the engine allows."""


class RequestTimedOut(EngineError, TimeoutError):
    """The request did not finish within the engine's request timeout; it was cancelled."""


class RequestCancelled(EngineError):
    """The request was cancelled before it produced images."""


class GenerationError(EngineError):
    """The worker could not produce an image for a request."""


class WorkerStartupError(EngineError):
    """A rank failed while loading; the message carries the rank's own traceback."""


class WorkerGroupDied(EngineError):
    """A rank process exited while requests were pending."""


_FAILURE_ERRORS: dict[FailureKind, type[EngineError]] = {
    FailureKind.CANCELLED: RequestCancelled,
    FailureKind.GROUP_BROKEN: WorkerGroupDied,
    FailureKind.PIPELINE_ERROR: GenerationError,
    FailureKind.INTERRUPTED: GenerationError,
}


def error_for(failure: GenerationFailure) -> EngineError:
    """The exception a rank's GenerationFailure stands for."""
    reason = " (a rank of the worker group died)" if failure.kind is FailureKind.GROUP_BROKEN else ""
    return _FAILURE_ERRORS[failure.kind](f"request {failure.request_id} failed{reason}: {failure.message}")
