"""What an images response says about the work behind it: OpenAI's `usage` (with the peak device
memory benchmark clients read), and the W3C `Server-Timing` header with the phases of the request.

Timing names follow TensorRT-LLM's visual-generation benchmark where it has one (server_e2e,
server_gen, server_pre_denoise, server_denoise, server_post_denoise); `queue` is the wait for the
ranks. Every phase lies inside server_e2e, so the parts never add up to more than the total.
"""

from __future__ import annotations

import time

from engine import OmniRequestOutput, TokenUsage
from server.schemas import ImageUsage, InputTokensDetails

_DESCRIPTIONS = {
    "queue": "waiting for the ranks",
    "server_pre_denoise": "text encoding and latent preparation",
    "server_denoise": "denoising steps",
    "server_post_denoise": "VAE decoding",
    "server_gen": "the engine from admission to images without the queue",
    "server_e2e": "request received to response ready",
}
_PHASES = {"server_pre_denoise": "pre_denoise_s", "server_denoise": "denoise_s",
           "server_post_denoise": "post_denoise_s"}


def peak_memory_mb(outputs: list[OmniRequestOutput]) -> float:
    """The highest peak of the ranks that made the images (0 for answers from the result cache)."""
    return round(max((output.timings.get("peak_memory_mb", 0.0) for output in outputs), default=0.0), 1)


def usage(outputs: list[OmniRequestOutput]) -> ImageUsage:
    total = sum((output.usage for output in outputs), TokenUsage())
    return ImageUsage(input_tokens=total.input_tokens, output_tokens=total.output_tokens,
                      total_tokens=total.total_tokens, peak_memory_mb=peak_memory_mb(outputs),
                      input_tokens_details=InputTokensDetails(text_tokens=total.text_tokens,
                                                              image_tokens=total.image_tokens))


def timings_ms(outputs: list[OmniRequestOutput], received: float) -> dict[str, float]:
    """Milliseconds per phase, of the output that finished last (the request's critical path), and
    server_e2e from `received` (perf_counter when the request arrived) to now."""
    last = max(outputs, key=lambda output: output.timings["total_s"]).timings
    seconds = {"queue": last["queue_s"]}
    seconds.update({name: last[key] for name, key in _PHASES.items() if key in last})
    seconds["server_gen"] = last["total_s"] - last["queue_s"]
    seconds["server_e2e"] = time.perf_counter() - received
    return {name: round(value * 1000, 2) for name, value in seconds.items()}


def server_timing_header(timings: dict[str, float]) -> dict[str, str]:
    return {"server-timing": ", ".join(f'{name};dur={ms:.2f};desc="{_DESCRIPTIONS[name]}"'
                                       for name, ms in timings.items())}
