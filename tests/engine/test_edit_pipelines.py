"""Image-to-image and inpainting through Omni (the family's edit pipelines, built with from_pipe on
the loaded one) equal plain diffusers on the same tiny model, inputs and seed, at TP=1 and TP=2."""

from __future__ import annotations

import pytest
import torch

from configs import load_family
from engine import (
    DiffusionParallelConfig,
    InvalidRequestError,
    Omni,
    OmniDiffusionSamplingParams,
    PromptInput,
    resolve_model,
)
from engine.intake.sampling import build_request
from tests.helpers import (
    REFERENCE_PROMPT,
    condition_image,
    edit_mask,
    load_plain_pipeline,
    max_pixel_difference,
    reference_image,
    reference_params,
)
from workers.pipeline_runner import PipelineRunner

PATHS = [("z-image", "image-to-image"), ("z-image", "inpaint"), ("qwen-image", "image-to-image"),
         ("qwen-image", "inpaint"), ("flux", "image-to-image"), ("flux", "inpaint"), ("sd3", "image-to-image"),
         ("sd3", "inpaint"), ("qwen-image-edit", "inpaint")]
WIDTH, HEIGHT = 96, 64


# qwen-image-edit's inpainting works at ~1 MP whatever the input (20+ s a run here): TP=2 only.
CASES = [(family, edit, size) for family, edit in PATHS for size in (1, 2) if (family, size) != ("qwen-image-edit", 1)]


@pytest.mark.parametrize("family,edit,size", CASES)
def test_edit_pipeline_equals_plain_diffusers(tiny_dir, family, edit, size):
    data = {"image": condition_image((WIDTH, HEIGHT))}
    if edit == "inpaint":
        data["mask"] = edit_mask((WIDTH, HEIGHT))
    params = reference_params(family)
    with Omni(model=f"tiny/{family}", parallel_config=DiffusionParallelConfig(tensor_parallel_size=size)) as omni:
        image = omni.generate({"prompt": REFERENCE_PROMPT, "multi_modal_data": data}, params)[0].images[0]
    expected = reference_image(tiny_dir(family), family, HEIGHT, WIDTH, edit)
    if family != "qwen-image-edit":  # its pipelines choose a ~1 MP size from the input's aspect
        assert image.size == (WIDTH, HEIGHT)  # an edit keeps its input's size
    assert max_pixel_difference(image, expected) <= 1


def test_a_model_that_cannot_inpaint_refuses_a_mask_naming_it():
    prompt = PromptInput("a cat", images=[condition_image((96, 64))], mask=edit_mask((96, 64)))
    with pytest.raises(InvalidRequestError, match="cannot inpaint") as error:
        build_request(resolve_model("tiny/qwen-image-edit-plus"), prompt, OmniDiffusionSamplingParams())
    assert error.value.param == "mask"


@pytest.mark.parametrize("family", ["sd3", "qwen-image-edit"])
def test_the_edit_pipelines_hold_the_loaded_models_not_copies(tiny_dir, family):
    """from_pipe hands over the loaded component objects: no weight is held twice."""
    config = load_family(family)
    runner = PipelineRunner(load_plain_pipeline(tiny_dir(family)), family=config)
    loaded = {name: id(c) for name, c in runner.pipeline.components.items() if isinstance(c, torch.nn.Module)}
    for edit in config.edit_pipelines:
        pipeline = runner.pipeline_for(edit)
        assert type(pipeline).__name__ == config.edit_pipelines[edit]
        held = {name: id(c) for name, c in pipeline.components.items() if isinstance(c, torch.nn.Module)}
        assert held and all(loaded[name] == identity for name, identity in held.items()), edit


def test_an_input_image_too_small_for_the_model_is_refused_naming_it():
    prompt = PromptInput("a cat", images=[condition_image((8, 8))])
    with pytest.raises(InvalidRequestError, match="sides of at least 64 pixels; got 8") as error:
        build_request(resolve_model("tiny/z-image"), prompt, OmniDiffusionSamplingParams())
    assert error.value.param == "image"
