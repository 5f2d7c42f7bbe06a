"""`stream=true`: OpenAI's image events over server-sent events.

Per image, up to `partial_images` events `image_generation.partial_image` (`image_edit.` for
edits) as the previews arrive, then one `...completed` event. Every event also carries
`image_index` (ditserve's extension: which of the request's images, counted over all prompts) so
a client can tell the images of an n>1 request apart. A completed event carries the `usage` of the
prompt its image belongs to and, as `server_timing`, the request's phases in milliseconds (the
names of the Server-Timing header of a plain response). An error after the stream started is an
`error` event with OpenAI's error body, which the SDK raises; a client that goes away cancels the
request at its next step.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator

from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from engine import AsyncEngine, EngineError, OmniDiffusionSamplingParams, OmniRequestOutput, PartialImage, PromptInput
from server.errors import APIError, api_error_for, error_body
from server.images import report
from server.images.codec import encode
from server.schemas import ImageRequest

logger = logging.getLogger(__name__)


def stream_response(engine: AsyncEngine, prompts: list[PromptInput], api_request: ImageRequest,
                    params: OmniDiffusionSamplingParams, event_prefix: str, received: float,
                    on_done) -> StreamingResponse:
    """Admit every prompt now (so a bad or unservable request is a plain HTTP error), then stream."""
    events: asyncio.Queue[tuple[int, PartialImage]] = asyncio.Queue()
    admitted = []
    try:
        for index, prompt in enumerate(prompts):
            admitted.append(engine.admit(prompt, params, lambda partial, i=index: events.put_nowait((i, partial))))
    except BaseException:
        for pending in admitted:
            engine.cancel(pending)
        raise
    n = params.num_outputs_per_prompt or 1
    body = _event_stream(engine, admitted, events, api_request, event_prefix, n, received, on_done)
    warnings = [w for pending in admitted for w in pending.request.warnings]
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"cache-control": "no-cache", **warning_headers(warnings)})


def warning_headers(warnings: list[str]) -> dict[str, str]:
    """A request served, but not quite as asked (prompt truncated, size far from the model's), says
    so in one header; the same text is in the server log."""
    return {"x-ditserve-warning": "; ".join(dict.fromkeys(warnings))} if warnings else {}


async def _event_stream(engine: AsyncEngine, admitted: list, events: asyncio.Queue, api_request: ImageRequest,
                        prefix: str, n: int, received: float, on_done) -> AsyncIterator[str]:
    work = asyncio.ensure_future(asyncio.gather(*(engine.result(pending) for pending in admitted)))
    try:
        while not work.done() or not events.empty():
            next_event = asyncio.ensure_future(events.get())
            await asyncio.wait({next_event, work}, return_when=asyncio.FIRST_COMPLETED)
            if not next_event.done():
                next_event.cancel()
                continue
            prompt_index, partial = next_event.result()
            fields = await _image_fields(partial.image, api_request)
            yield _event(f"{prefix}.partial_image", partial_image_index=partial.partial_index,
                         image_index=prompt_index * n + partial.image_index, **fields)
        outputs: list[OmniRequestOutput] = work.result()
        on_done(outputs)
        timings = report.timings_ms(outputs, received)
        for prompt_index, output in enumerate(outputs):
            usage = report.usage([output]).model_dump()  # of the prompt this image belongs to
            for image_index, (image, seed) in enumerate(zip(output.images, output.seeds)):
                fields = await _image_fields(image, api_request)
                yield _event(f"{prefix}.completed", image_index=prompt_index * n + image_index, seed=seed,
                             usage=usage, server_timing=timings, **fields)
    except EngineError as exc:
        yield _error_event(api_error_for(exc))
    except APIError as exc:
        yield _error_event(exc)
    except Exception:
        logger.exception("a streamed image request failed")
        yield _error_event(APIError(500, "internal error while streaming; see the server log", code="internal_error"))
    finally:
        work.cancel()  # the client went away (or the stream ended): stop at the next step


async def _image_fields(image, api_request: ImageRequest) -> dict:
    encoded = await run_in_threadpool(encode, image, api_request.output_format, api_request.output_compression)
    return {"b64_json": base64.b64encode(encoded).decode("ascii"), "created_at": int(time.time()),
            "size": f"{image.width}x{image.height}", "output_format": api_request.output_format,
            "quality": api_request.quality or "auto", "background": "opaque"}


def _event(kind: str, **data) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"


def _error_event(error: APIError) -> str:
    return f"event: error\ndata: {json.dumps(error_body(error))}\n\n"
