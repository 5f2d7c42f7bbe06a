"""The driver rank's diffusers pipeline: loads it and turns a GenerationRequest into images."""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import resource
import threading
import time
from collections.abc import Callable
from typing import Any

import diffusers
import torch

from configs import CacheSettings, load_family
from configs.families import FamilyConfig, PreviewPlan
from workers.lora.adapter_library import AdapterLibrary
from workers.messages import GenerationBatch, GenerationPartial, GenerationResult, WorkerSpec
from workers.parallel import forward_broadcast
from workers.parallel.cfg_parallel import CfgDispatcher
from workers.parallel.compiled_blocks import compile_stats
from workers.partial_previews import PreviewDecoder, preview_steps
from workers.prompt_cache import PromptCache
from workers.qwen_vl_processor import Qwen2VLImageOnlyProcessor

logger = logging.getLogger(__name__)


def load_pipeline(spec: WorkerSpec, **components: Any) -> diffusers.DiffusionPipeline:
    """The pipeline at spec.model_path around `components` (every model, loaded and placed by the
    rank); diffusers loads the rest (tokenizers, scheduler)."""
    family = load_family(spec.family_name)
    if family.is_edit and "processor" not in components:
        components["processor"] = Qwen2VLImageOnlyProcessor.from_pretrained(spec.model_path / "processor")
    pipeline_class = getattr(diffusers, family.pipeline_class)
    pipeline = pipeline_class.from_pretrained(
        spec.model_path, dtype=getattr(torch, spec.dtype), **components
    )
    pipeline.set_progress_bar_config(disable=True)
    if spec.vae_use_tiling:
        pipeline.vae.enable_tiling()
    if spec.vae_use_slicing:
        pipeline.vae.enable_slicing()
    return pipeline


class BatchCancelled(Exception):
    """Raised from the step callback to abandon a pipeline call whose every request was cancelled."""


class NonFiniteLatents(RuntimeError):
    """The latents held NaN or inf after a step: the image would be black or noise, so it is not made."""


class PhaseClock:
    """Splits one pipeline call's time at its first DiT call and the end of its last step: before
    (text encoding, latent and condition preparation), denoising, after (VAE decoding)."""

    def __init__(self, dit: torch.nn.Module):
        self.started, self.first_dit_call, self.last_step_end = time.perf_counter(), None, None
        self._thread = threading.get_ident()  # other threads' pipeline calls use the same DiT
        self._hook = dit.register_forward_pre_hook(self._dit_called)

    def _dit_called(self, module, args) -> None:
        if self.first_dit_call is None and threading.get_ident() == self._thread:
            self.first_dit_call = time.perf_counter()

    def step_ended(self) -> None:
        self.last_step_end = time.perf_counter()

    def phases(self) -> dict[str, float]:
        """Seconds of each phase; none where the pipeline never reached the DiT (or reported no step)."""
        self._hook.remove()
        ended = time.perf_counter()
        if self.first_dit_call is None or self.last_step_end is None:
            return {}
        return {"pre_denoise_s": self.first_dit_call - self.started,
                "denoise_s": self.last_step_end - self.first_dit_call,
                "post_denoise_s": ended - self.last_step_end}


def _peak_memory_bytes(on_cuda: bool) -> int:
    """CUDA: this rank's peak allocation since the batch began (weights included). CPU: the rank
    process's peak resident memory so far, which bounds the batch's (Linux reports KiB)."""
    return torch.cuda.max_memory_allocated() if on_cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PipelineRunner:
    """Runs batches through one loaded pipeline (or an edit pipeline built from it), passing only
    arguments the pipeline's __call__ accepts."""

    def __init__(self, pipeline: diffusers.DiffusionPipeline, dispatcher: CfgDispatcher | None = None,
                 family: FamilyConfig | None = None, adapters: AdapterLibrary | None = None,
                 cache: CacheSettings = CacheSettings(), prompt_cache: PromptCache | None = None,
                 concurrent: bool = False):
        """concurrent: several `run` calls at once, from several threads (continuous batching): each
        gets a pipeline of its own around the shared models (its own scheduler state)."""
        self.pipeline = pipeline
        self.concurrent = concurrent
        if concurrent:
            _one_call_at_a_time(pipeline.vae, ("encode", "decode"))
        self.cache = cache  # the server's step caching; each batch's requests may turn it off
        self.prompt_cache = prompt_cache or PromptCache(0)
        self.prompt_cache.install(pipeline, "main")
        self.dispatcher = dispatcher
        self.adapters = adapters
        self.previews = PreviewDecoder(pipeline, family.preview if family else PreviewPlan())
        self._edit_classes = family.edit_pipelines if family else {}
        self._pipelines = {"main": pipeline}
        self._accepted = {"main": set(inspect.signature(pipeline.__call__).parameters)}

    def pipeline_for(self, name: str) -> diffusers.DiffusionPipeline:
        """"main", or an edit pipeline made on first use with diffusers' from_pipe: it holds the
        same component objects (no second copy of any weight; the DiT's dispatcher and the text
        encoders' broadcast hooks come along)."""
        if name not in self._pipelines:
            pipeline = getattr(diffusers, self._edit_classes[name]).from_pipe(self.pipeline)
            pipeline.set_progress_bar_config(disable=True)
            self.prompt_cache.install(pipeline, name)
            self._pipelines[name] = pipeline
            self._accepted[name] = set(inspect.signature(pipeline.__call__).parameters)
        return self._pipelines[name]

    def _pipeline_for_call(self, name: str) -> diffusers.DiffusionPipeline:
        """The pipeline one call runs: the shared one, or with concurrent calls a copy of it with the
        same models and a scheduler of its own (diffusers' schedulers keep the loop's state)."""
        shared = self.pipeline_for(name)
        if not self.concurrent:
            return shared
        pipeline = type(shared)(**{**shared.components, "scheduler": copy.deepcopy(shared.scheduler)})
        pipeline.set_progress_bar_config(disable=True)
        self.prompt_cache.install(pipeline, name)
        encode = getattr(pipeline, "encode_prompt", None)
        if encode is not None:  # text encoders broadcast their calls: one pipeline call's at a time
            pipeline.encode_prompt = functools.wraps(encode)(lambda *args, **kwargs: _on_ranks(encode, args, kwargs))
        return pipeline

    def _accepted_by(self, name: str) -> set[str]:
        self.pipeline_for(name)
        return self._accepted[name]

    def call_arguments(self, batch: GenerationBatch) -> dict[str, Any]:
        """One pipeline call for the batch; its requests share every value but prompt, negative and seed."""
        first, requests = batch.requests[0], batch.requests
        accepted = self._accepted_by(first.pipeline)

        def per_prompt(values: list) -> Any:  # a lone request passes plain values, as a diffusers user would
            return values[0] if len(values) == 1 else values

        arguments = {
            **first.sampling.pipeline_arguments(),
            "prompt": per_prompt([r.prompt for r in requests]),
            "negative_prompt": None if first.negative_prompt is None else per_prompt(
                [r.negative_prompt for r in requests]),
            "image": first.images[0] if len(first.images) == 1 else first.images or None,
            "mask_image": first.mask,
            # Noise always comes from CPU generators on the driver, one per image (seed + i), so an
            # image is the same on any device, at any tensor-parallel size and in any batch.
            "generator": [torch.Generator("cpu").manual_seed(seed) for r in requests for seed in r.image_seeds],
        }
        return {k: v for k, v in arguments.items() if v is not None and k in accepted}

    @torch.inference_mode()
    def run(self, batch: GenerationBatch, should_stop: Callable[[], bool] = lambda: False,
            on_partial: Callable[[GenerationPartial], None] | None = None) -> list[GenerationResult]:
        """Results in request order; raises BatchCancelled when should_stop() turns true after a step.
        With `on_partial`, the batch's `partial_images` previews go to it as they are made."""
        started, compiled_before = time.perf_counter(), compile_stats()
        on_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
        step_ends: list[float] = []
        sampling = batch.requests[0].sampling
        preview_at = preview_steps(sampling.num_inference_steps, sampling.partial_images) if on_partial else []
        previous: list[torch.Tensor] = []

        merger = self.dispatcher.merger if self.dispatcher is not None else None

        def after_step(pipeline, step: int, timestep, tensors: dict) -> dict:
            step_ends.append(time.perf_counter())
            clock.step_ended()
            if merger is not None and step + 1 == getattr(pipeline, "_num_timesteps", None):
                merger.leave()  # its last DiT call is made: the others' steps stop waiting for it
            if self.dispatcher is not None:
                self.dispatcher.check_settled()
            latents = tensors.get("latents")
            if latents is not None and not torch.isfinite(latents).all():
                raise NonFiniteLatents(
                    f"the latents became NaN or infinite at denoising step {step + 1}; no image was made "
                    "(too few steps for the scheduler, or a numerically broken model or dtype)")
            if should_stop():
                raise BatchCancelled
            if step in preview_at:
                self._send_previews(batch, pipeline.scheduler, previous.pop(), latents, preview_at.index(step),
                                    on_partial)
            if step + 1 in preview_at:
                previous.append(latents.clone())
            return tensors

        arguments = self.call_arguments(batch)
        first = batch.requests[0]
        if self.adapters is not None:  # a batch's requests share their adapters (engine.scheduler.batch_key)
            self.adapters.activate(first.loras)
        self.prompt_cache.begin(first.loras)
        if self.dispatcher is not None:
            self.dispatcher.begin(self.dispatcher.plan.calls_twice(first.sampling.true_cfg_scale,
                                                                   first.negative_prompt),
                                  self.cache.for_request(first.sampling.cache, first.sampling.cache_threshold,
                                                         first.sampling.num_inference_steps), bool(first.loras))
        pipeline = self._pipeline_for_call(first.pipeline)
        if "callback_on_step_end" in self._accepted_by(first.pipeline):
            arguments["callback_on_step_end"] = after_step
        clock = PhaseClock(pipeline.transformer)
        try:
            images = list(pipeline(**arguments, output_type="pil").images)
        finally:
            phases = clock.phases()
            if merger is not None:
                merger.leave()
        inference_s = time.perf_counter() - started
        step_s = [b - a for a, b in zip(step_ends, step_ends[1:])]
        step_cache = self.dispatcher.executor.step_cache if self.dispatcher is not None else None
        cached_steps = step_cache.cached_calls if step_cache is not None else 0
        if cached_steps:
            logger.info("batch of %d image(s): %d of %d steps cached (%s)", len(images), cached_steps,
                        first.sampling.num_inference_steps, step_cache.settings.backend)
        if step_cache is not None and step_cache.settings.calibrate:
            logger.info("magcache calibration at %d steps, pass as --cache-config '{\"mag_ratios\": %s}'",
                        first.sampling.num_inference_steps, step_cache.calibration())
        compiled = compile_stats() - compiled_before
        if compiled.graphs:
            logger.info("batch of %d image(s) at %dx%d compiled %d graph(s) in %.1f s (%d read from the compile "
                        "cache)", len(images), sampling.width, sampling.height, compiled.graphs, compiled.seconds,
                        compiled.cache_hits)
        forward_rows, merged = merger.drain() if merger is not None else ([], 0)
        results, offset = [], 0
        for request in batch.requests:
            count = request.sampling.num_outputs_per_prompt
            results.append(GenerationResult(
                request_id=request.request_id,
                images=images[offset : offset + count],
                seeds=request.image_seeds,
                inference_s=inference_s,
                step_s=step_s,
                batch_images=len(images),
                cached_steps=cached_steps,
                prompt_cache_hits=self.prompt_cache.hits,
                compiled=compiled,
                phases=phases,
                peak_memory_bytes=_peak_memory_bytes(on_cuda),
                forward_rows=forward_rows if not results else [],  # each forward counted once
                merged_forwards=merged if not results else 0,
            ))
            offset += count
        return results

    def _send_previews(self, batch: GenerationBatch, scheduler, before: torch.Tensor, after: torch.Tensor,
                       index: int, on_partial: Callable[[GenerationPartial], None]) -> None:
        sampling = batch.requests[0].sampling
        images = self.previews.decode(self.previews.clean_estimate(before, after, scheduler), sampling.height,
                                      sampling.width)
        offset = 0
        for request in batch.requests:
            for image_index in range(request.sampling.num_outputs_per_prompt):
                on_partial(GenerationPartial(request.request_id, image_index, index, images[offset + image_index]))
            offset += request.sampling.num_outputs_per_prompt


def _one_call_at_a_time(module: torch.nn.Module, methods: tuple[str, ...]) -> None:
    """Serialise the threads' calls of `module`'s methods: Qwen-Image's VAE (a causal video VAE)
    keeps a feature cache in the module while it encodes or decodes, so two at once corrupt both."""
    lock = threading.Lock()
    for name in methods:
        method = getattr(module, name)

        def serialised(*args, method=method, **kwargs):
            with lock:
                return method(*args, **kwargs)

        setattr(module, name, functools.wraps(method)(serialised))


def _on_ranks(function: Callable, args: tuple, kwargs: dict) -> Any:
    with forward_broadcast.on_ranks():
        return function(*args, **kwargs)
