"""Partial images: the model's current estimate of the final image, decoded on the driver.

All five families sample with flow matching (FlowMatchEulerDiscreteScheduler): a step moves the
latent along the velocity, x_next = x + (sigma_next - sigma) * v, and the clean image the model
currently aims at is x0 = x_next - sigma_next * v. The step callback sees the latents after each
step, so two consecutive ones give v exactly; no pipeline code changes. The estimate is decoded at
half resolution (a quarter of the VAE's work) and resized to the asked size; nothing the pipeline
uses is touched, so the final image is the same with or without previews.
"""

from __future__ import annotations

import diffusers
import torch
import torch.nn.functional as F
from PIL import Image

from configs.families import PreviewPlan

# Below this many latent pixels per side the preview is decoded at full resolution.
_HALVE_FROM_LATENT_SIDE = 16


def preview_steps(num_inference_steps: int, partial_images: int) -> list[int]:
    """The 0-based steps after which previews are made: spread over the run, never the first (no
    velocity yet) nor the last (the final image follows at once). Fewer when there are few steps."""
    candidates = list(range(1, num_inference_steps - 1))
    count = min(partial_images, len(candidates))
    if not count:
        return []
    return sorted({candidates[(k + 1) * len(candidates) // (count + 1)] for k in range(count)})


class PreviewDecoder:
    def __init__(self, pipeline: diffusers.DiffusionPipeline, plan: PreviewPlan):
        self.pipeline, self.plan = pipeline, plan

    def clean_estimate(self, before: torch.Tensor, after: torch.Tensor, scheduler) -> torch.Tensor:
        """x0 from the latents before and after the step `scheduler` (the running call's: with
        concurrent calls each has its own) just made."""
        index = scheduler.step_index
        sigma_before, sigma_after = (float(s) for s in scheduler.sigmas[index - 1 : index + 1])
        velocity = (after.float() - before.float()) / (sigma_after - sigma_before)
        return after.float() - sigma_after * velocity

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> list[Image.Image]:
        pipeline, plan = self.pipeline, self.plan
        vae = pipeline.vae
        if plan.packed:
            latents = pipeline._unpack_latents(latents, height, width, pipeline.vae_scale_factor)
        if min(latents.shape[-2:]) >= _HALVE_FROM_LATENT_SIDE:
            spatial = latents.flatten(0, -3) if latents.dim() == 5 else latents
            pooled = F.avg_pool2d(spatial, 2)
            latents = pooled.view(*latents.shape[:-2], *pooled.shape[-2:])
        latents = latents.to(vae.dtype)
        if plan.normalisation == "mean_std":
            shape = (1, vae.config.z_dim) + (1,) * (latents.dim() - 2)
            mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents)
            std = torch.tensor(vae.config.latents_std).view(shape).to(latents)
            latents = latents * std + mean
        else:
            latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        if plan.frames:
            image = image[:, :, 0]
        images = pipeline.image_processor.postprocess(image, output_type="pil")
        return [im if im.size == (width, height) else im.resize((width, height), Image.BICUBIC) for im in images]
