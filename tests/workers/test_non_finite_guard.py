"""Too few steps for a scheduler is refused up front; latents that still turn NaN fail the request."""

from __future__ import annotations

import pytest

from configs import OmniDiffusionSamplingParams, SamplingParams
from engine import InvalidRequestError, PromptInput, resolve_model
from engine.intake.sampling import build_request
from tests.helpers import load_plain_pipeline
from workers import GenerationBatch, GenerationRequest
from workers.pipeline_runner import NonFiniteLatents, PipelineRunner


def test_qwen_image_refuses_one_step_and_says_the_minimum():
    with pytest.raises(InvalidRequestError, match="num_inference_steps=1 is too few for qwen-image models: its "
                                                  "scheduler needs at least 2") as error:
        build_request(resolve_model("tiny/qwen-image"), PromptInput("a cat"), OmniDiffusionSamplingParams(
            num_inference_steps=1))
    assert error.value.param == "num_inference_steps"
    assert build_request(resolve_model("tiny/z-image"), PromptInput("a cat"), OmniDiffusionSamplingParams(
        num_inference_steps=1)).sampling.num_inference_steps == 1


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # the scheduler's 0/0
def test_nan_latents_fail_the_batch_instead_of_returning_a_black_image(tiny_dir):
    # One step past the engine's check: the published Qwen-Image scheduler's only sigma is NaN.
    runner = PipelineRunner(load_plain_pipeline(tiny_dir("qwen-image")))
    sampling = SamplingParams(num_inference_steps=1, height=64, width=64, true_cfg_scale=4.0)
    batch = GenerationBatch([GenerationRequest("r1", "a cat", 1, sampling, negative_prompt=" ")])
    with pytest.raises(NonFiniteLatents, match="NaN or infinite at denoising step 1"):
        runner.run(batch)
    fine = GenerationBatch([GenerationRequest("r2", "a cat", 1, SamplingParams(
        num_inference_steps=2, height=64, width=64, true_cfg_scale=4.0), negative_prompt=" ")])
    assert runner.run(fine)[0].images[0].size == (64, 64)
