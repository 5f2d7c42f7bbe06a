"""MagCache's calibration (workers/parallel/step_cache.py) measures what MagCache defines: the mean
over tokens of the block stack's residual norm at one step over the step before, and never skips."""

from __future__ import annotations

import torch

from configs import CacheSettings, load_family
from engine.models.tiny_models import build_transformer
from workers.parallel.step_cache import StepCache

TIMESTEPS = (900.0, 600.0, 300.0, 100.0)


def test_calibration_gives_the_ratio_of_residual_norms_and_the_plain_output():
    family = load_family("sd3")
    torch.manual_seed(0)
    dit = build_transformer(family.transformer_class, family.tiny.transformer).eval()
    config = dit.config
    inputs = dict(hidden_states=torch.randn(1, config.in_channels, 16, 16),
                  encoder_hidden_states=torch.randn(1, 6, config.joint_attention_dim),
                  pooled_projections=torch.randn(1, config.pooled_projection_dim), return_dict=False)
    stack_inputs, residuals = [], []
    dit.transformer_blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: stack_inputs.append(kwargs["hidden_states"]), with_kwargs=True)
    dit.transformer_blocks[-1].register_forward_hook(
        lambda module, args, output: residuals.append(output[1] - stack_inputs[-1]))
    cache = StepCache(dit)

    def run(settings: CacheSettings) -> list[torch.Tensor]:
        cache.begin(settings)
        outputs = []
        with torch.no_grad():
            for timestep in TIMESTEPS:
                with cache.call("cond", axes=()):
                    outputs.append(dit(timestep=torch.tensor([timestep]), **inputs)[0])
        return outputs

    plain = run(CacheSettings())
    residuals.clear()
    calibrating = run(CacheSettings(backend="magcache", calibrate=True, steps=len(TIMESTEPS)))
    assert all(torch.equal(a, b) for a, b in zip(plain, calibrating)) and cache.cached_calls == 0
    norms = [residual.norm(dim=-1) for residual in residuals]
    expected = [1.0] + [(now / (before + 1e-8)).mean().item() for before, now in zip(norms, norms[1:])]
    assert len(cache.calibration()) == len(TIMESTEPS)
    assert max(abs(a - b) for a, b in zip(cache.calibration(), expected)) < 2e-5
    assert len(set(cache.calibration())) > 2  # the residuals' size really changes with the timestep
