"""Offloaded models (--text-encoder-offload, --vae-offload) are brought to the rank's device once
per use and sent home after, through every method the pipelines call, and compute the same.

This machine has only the CPU, so the moves are recorded rather than seen in device memory; the
whole path through real ranks is in tests/engine/test_tensor_parallel_omni.py.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from engine.models.tiny_models import autoencoder_kl
from workers import offload as offload_module
from workers.offload import home_device, offload

HOME, DEVICE = torch.device("cpu"), torch.device("cpu", 0)  # two names, so each move is told apart


@pytest.fixture
def moves(monkeypatch):
    """Where the model went, in order: DEVICE for each move in, HOME for each return to the home copies."""
    recorded = []
    move, point_at = offload_module._move, offload_module._point_at

    def moving(module, device):
        recorded.append(device)
        move(module, device)

    def going_home(module, tensors):
        assert all(t.device == HOME for t in tensors.values())
        recorded.append(HOME)
        point_at(module, tensors)

    monkeypatch.setattr(offload_module, "_move", moving)
    monkeypatch.setattr(offload_module, "_point_at", going_home)
    return recorded


def tiny_vae():
    torch.manual_seed(0)
    return autoencoder_kl({"block_out_channels": [8, 16], "latent_channels": 4}).eval()


def test_vae_methods_move_it_once_per_call_and_give_the_same_result(moves):
    plain, offloaded = tiny_vae(), tiny_vae()
    offload(offloaded, HOME, DEVICE)
    image = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        latents = offloaded.encode(image).latent_dist.mode()
        assert moves == [DEVICE, HOME]
        torch.testing.assert_close(latents, plain.encode(image).latent_dist.mode(), rtol=0, atol=0)
        torch.testing.assert_close(offloaded.decode(latents).sample, plain.decode(latents).sample, rtol=0, atol=0)
        assert moves == [DEVICE, HOME] * 2
        offloaded(image)  # forward calls encode and decode inside: still one move each way
    assert moves == [DEVICE, HOME] * 3


def test_going_home_restores_the_home_copies_and_copies_nothing(moves):
    vae = tiny_vae()
    offload(vae, HOME, DEVICE)
    before = {name: t.data_ptr() for name, t in vae.state_dict().items()}
    with torch.inference_mode():
        vae.decode(torch.rand(1, 4, 8, 8))
    assert {name: t.data_ptr() for name, t in vae.state_dict().items()} == before


def test_a_failing_call_still_sends_the_model_home(moves):
    config = transformers.CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=16)
    encoder = transformers.CLIPTextModel(config).eval()
    offload(encoder, HOME, DEVICE)
    with torch.inference_mode():
        encoder(input_ids=torch.tensor([[1, 2, 3]]))
        with pytest.raises(IndexError):
            encoder(input_ids=torch.tensor([[1, 2, 999]]))  # beyond the vocabulary
    assert moves == [DEVICE, HOME] * 2
    encoder(input_ids=torch.tensor([[1, 2, 3]]))  # weights moved inside inference mode stay usable outside it


def test_home_devices_follow_the_settings():
    offload = {"text_encoder": "cpu"}
    device = torch.device("cuda", 0)
    assert home_device("text_encoder_2", offload, device) == torch.device("cpu")
    assert home_device("vae", offload, device) == device
    assert home_device("transformer", {"text_encoder": "cpu", "vae": "cpu"}, device) == device
