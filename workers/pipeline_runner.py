"""The driver rank's diffusers pipeline: loads it and turns a GenerationRequest into images."""

from __future__ import annotations

import inspect
import time
from typing import Any

import diffusers
import torch
from configs import load_family

from workers.messages import GenerationRequest, GenerationResult, WorkerSpec
from workers.qwen_vl_processor import Qwen2VLImageOnlyProcessor


def load_pipeline(spec: WorkerSpec, **components: Any) -> diffusers.DiffusionPipeline:
    """Load the pipeline at spec.model_path; `components` replace the ones on disk."""
    family = load_family(spec.family_name)
    if family.is_edit and "processor" not in components:
        components["processor"] = Qwen2VLImageOnlyProcessor.from_pretrained(spec.model_path / "processor")
    pipeline_class = getattr(diffusers, family.pipeline_class)
    pipeline = pipeline_class.from_pretrained(
        spec.model_path, dtype=getattr(torch, spec.dtype), **components
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(spec.device_type)


class PipelineRunner:
    """Runs requests through one loaded pipeline, passing only arguments its __call__ accepts."""

    def __init__(self, pipeline: diffusers.DiffusionPipeline):
        self.pipeline = pipeline
        self._accepted = set(inspect.signature(pipeline.__call__).parameters)

    def call_arguments(self, request: GenerationRequest) -> dict[str, Any]:
        images = request.images[0] if len(request.images) == 1 else request.images or None
        arguments = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "image": images,
            "num_inference_steps": request.num_inference_steps,
            "guidance_scale": request.guidance_scale,
            "true_cfg_scale": request.true_cfg_scale,
            "height": request.height,
            "width": request.width,
            "num_images_per_prompt": request.num_outputs,
            "max_sequence_length": request.max_sequence_length,
            # Noise always comes from a CPU generator on the driver: the same seed gives the
            # same image on any device and at any tensor-parallel size.
            "generator": torch.Generator("cpu").manual_seed(request.seed),
        }
        return {k: v for k, v in arguments.items() if v is not None and k in self._accepted}

    @torch.inference_mode()
    def run(self, request: GenerationRequest) -> GenerationResult:
        started = time.perf_counter()
        output = self.pipeline(**self.call_arguments(request), output_type="pil")
        return GenerationResult(
            request_id=request.request_id,
            images=list(output.images),
            seed=request.seed,
            inference_s=time.perf_counter() - started,
        )
