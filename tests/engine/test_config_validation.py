"""Every setting is checked where it is defined, before any process starts."""

from __future__ import annotations

import multiprocessing

import pytest

from configs import OmniDiffusionSamplingParams, SamplingParams, SamplingValueError
from engine import DiffusionParallelConfig, EngineConfig, resolve_model
from engine.parallel_config import worker_spec


@pytest.mark.parametrize("field,value", [("max_queue_size", 0), ("max_batch_size", 0), ("request_timeout_s", 0.0),
                                         ("startup_timeout_s", -1.0), ("scheduling", "'eager'"),
                                         ("max_active_requests", 0)])
def test_engine_config_rejects_values_that_cannot_work(field, value):
    with pytest.raises(ValueError, match=f"{field}={value}"):
        EngineConfig(model="tiny/z-image", **{field: value.strip("'") if isinstance(value, str) else value})


def test_offload_settings_must_name_a_device():
    with pytest.raises(ValueError, match="vae_offload='gpu please' is not a device name"):
        EngineConfig(model="tiny/z-image", vae_offload="gpu please")
    assert EngineConfig(model="tiny/z-image", text_encoder_offload="cpu").offload == {
        "text_encoder": "cpu", "vae": None}


def test_sampling_params_resolve_asked_values_over_defaults_and_check_bounds():
    defaults = OmniDiffusionSamplingParams(num_inference_steps=9, height=128, width=128, guidance_scale=0.0)
    resolved = SamplingParams.resolve(OmniDiffusionSamplingParams(num_inference_steps=3, width=96), defaults)
    assert resolved == SamplingParams(num_inference_steps=3, height=128, width=96, guidance_scale=0.0, cache="on")
    assert resolved.pipeline_arguments() == {
        "num_inference_steps": 3, "num_images_per_prompt": 1, "height": 128, "width": 96, "guidance_scale": 0.0}
    unset = OmniDiffusionSamplingParams()
    square = SamplingParams.resolve(OmniDiffusionSamplingParams(num_inference_steps=1, height=80), unset)
    assert (square.height, square.width) == (80, 80)
    with pytest.raises(SamplingValueError, match="true_cfg_scale=101.0 must be between 0 and 100") as error:
        SamplingParams.resolve(OmniDiffusionSamplingParams(true_cfg_scale=101.0), defaults)
    assert error.value.param == "true_cfg_scale"


def test_tensor_parallel_size_beyond_the_cuda_devices_is_an_error_not_a_silent_cpu_run(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    before = set(multiprocessing.active_children())
    model = resolve_model("tiny/z-image")
    expected = "tensor_parallel_size=4 needs 4 CUDA devices, one per rank, but this machine has 2"
    with pytest.raises(ValueError, match=expected):
        worker_spec(model, DiffusionParallelConfig(tensor_parallel_size=4))
    assert worker_spec(model, DiffusionParallelConfig(tensor_parallel_size=2)).device_type == "cuda"
    assert set(multiprocessing.active_children()) == before
