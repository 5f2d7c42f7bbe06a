"""Trains `builtin/shapes` from a fixed seed and writes it as a Z-Image diffusers folder.

    python -m tools.shapes.train [--output engine/models/builtin/shapes] [--recipe tools/shapes/recipe.yaml]

First an AutoencoderKL on drawn scenes, then the DiT and the text encoder together on the VAE's
latents of the training scenes (flow matching, as the pipeline samples). The judge's held-out
colour/shape/position combinations are never drawn.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
from tqdm import tqdm

from engine.models.tiny_models import autoencoder_kl, build_transformer
from engine.models.tiny_tokenizers import build_qwen_tokenizer
from tools.shapes.scenes import Scene, all_scenes, draw, held_out_triples

HERE = Path(__file__).parent
DEFAULT_OUTPUT = HERE.parent.parent / "engine" / "models" / "builtin" / "shapes"


def _caption_corpus(scenes: list[Scene]) -> list[str]:
    return ["user assistant"] + [
        scene.caption(size, position, variant)
        for scene in scenes for size in (True, False) for position in (True, False) for variant in (0, 1)
    ]


def build_pipeline(recipe: dict[str, Any], scenes: list[Scene]) -> ZImagePipeline:
    torch.manual_seed(recipe["seed"])
    tokenizer = build_qwen_tokenizer(chat_template=True, corpus=_caption_corpus(scenes))
    text_config = transformers.Qwen3Config(vocab_size=len(tokenizer), **recipe["text_encoder"])
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**recipe["scheduler"]),
        vae=autoencoder_kl(recipe["vae"]),
        text_encoder=transformers.Qwen3Model(text_config),
        tokenizer=tokenizer,
        transformer=build_transformer("ZImageTransformer2DModel", recipe["transformer"]),
    )


def _pixels(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _random_crop(pixels: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    top, left = rng.integers(0, pixels.shape[-1] - size + 1, size=2)
    return pixels[..., top : top + size, left : left + size]


def _warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_vae(vae, scenes: list[Scene], settings: dict[str, Any], rng: np.random.Generator) -> float:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings["learning_rate"], weight_decay=0.0)
    schedule = _warmup_cosine(optimizer, 50, settings["steps"])
    smoothed = None
    with tqdm(range(settings["steps"]), desc="vae", unit="step") as bar:
        for _ in bar:
            picks = rng.integers(len(scenes), size=settings["batch_size"])
            pixels = _random_crop(_pixels([draw(scenes[i], rng) for i in picks]), settings["crop_size"], rng)
            posterior = vae.encode(pixels).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
            loss = F.mse_loss(reconstruction, pixels) + settings["kl_weight"] * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)  # without it the loss spikes and stalls
            optimizer.step()
            schedule.step()
            smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
            bar.set_postfix(loss=f"{smoothed:.5f}")
    return smoothed


@torch.no_grad()
def encode_scenes(vae, scenes: list[Scene], copies: int, rng: np.random.Generator) -> tuple[torch.Tensor, list[Scene]]:
    """Posterior means of `copies` jittered drawings of every scene; the VAE's shift and scale are
    set so the pipeline's latents have zero mean and unit variance."""
    drawn = [scene for scene in scenes for _ in range(copies)]
    latents = []
    for start in tqdm(range(0, len(drawn), 64), desc="encode", unit="batch"):
        pixels = _pixels([draw(scene, rng) for scene in drawn[start : start + 64]])
        latents.append(vae.encode(pixels).latent_dist.mean)
    latents = torch.cat(latents)
    shift, scale = latents.mean().item(), 1.0 / latents.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return (latents - shift) * scale, drawn


def _training_caption(scene: Scene, settings: dict[str, Any], rng: np.random.Generator) -> str:
    if rng.random() < settings["empty_caption"]:
        return ""
    return scene.caption(
        with_size=rng.random() >= settings["drop_size"],
        with_position=rng.random() >= settings["drop_position"],
        variant=int(rng.integers(2)),
    )


def train_dit(pipeline: ZImagePipeline, latents: torch.Tensor, scenes: list[Scene], settings: dict[str, Any],
              shift: float, rng: np.random.Generator) -> float:
    """Flow matching in the pipeline's conventions: the transformer sees t = 1 - sigma and predicts
    x0 - noise; sigmas are drawn as the scheduler's shift spreads them at sampling time."""
    modules = (pipeline.transformer, pipeline.text_encoder)
    parameters = [p for module in modules for p in module.parameters()]
    averaged = [p.detach().clone() for p in parameters]
    optimizer = torch.optim.AdamW(parameters, lr=settings["learning_rate"], weight_decay=0.01)
    schedule = _warmup_cosine(optimizer, settings["warmup_steps"], settings["steps"])
    for module in modules:
        module.train()
    smoothed = None
    with tqdm(range(settings["steps"]), desc="dit", unit="step") as bar:
        for step in bar:
            picks = rng.integers(len(scenes), size=settings["batch_size"])
            captions = [_training_caption(scenes[i], settings, rng) for i in picks]
            caption_features = pipeline._encode_prompt(
                captions, device=torch.device("cpu"), max_sequence_length=settings["max_sequence_length"]
            )
            clean = latents[picks]
            noise = torch.randn_like(clean)
            uniform = torch.rand(len(picks))
            sigma = shift * uniform / (1 + (shift - 1) * uniform)
            noisy = (1 - sigma[:, None, None, None]) * clean + sigma[:, None, None, None] * noise
            predicted = pipeline.transformer(
                list(noisy.unsqueeze(2).unbind(0)), 1 - sigma, caption_features, return_dict=False
            )[0]
            loss = F.mse_loss(torch.stack(predicted).squeeze(2), clean - noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            decay = min(settings["ema_decay"], (1 + step) / (10 + step))
            with torch.no_grad():
                for average, parameter in zip(averaged, parameters):
                    average.lerp_(parameter, 1 - decay)
            smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
            bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{schedule.get_last_lr()[0]:.1e}")
    with torch.no_grad():
        for average, parameter in zip(averaged, parameters):
            parameter.copy_(average)
    for module in modules:
        module.eval()
    return smoothed


def train(recipe: dict[str, Any], output: Path) -> dict[str, Any]:
    started = time.monotonic()
    rng = np.random.default_rng(recipe["seed"])
    scenes = all_scenes(exclude=held_out_triples())
    pipeline = build_pipeline(recipe, scenes)
    vae_loss = train_vae(pipeline.vae, scenes, recipe["vae_training"], rng)
    pipeline.vae.eval()
    settings = recipe["dit_training"]
    latents, drawn = encode_scenes(pipeline.vae, scenes, settings["images_per_scene"], rng)
    pipeline.vae.requires_grad_(False)
    dit_loss = train_dit(pipeline, latents, drawn, settings, recipe["scheduler"]["shift"], rng)
    pipeline.save_pretrained(output, safe_serialization=True)
    report = {
        "recipe": recipe,
        "training_scenes": len(scenes),
        "final_loss": {"vae": round(vae_loss, 6), "dit": round(dit_loss, 5)},
        "minutes": round((time.monotonic() - started) / 60, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    (output / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"default {DEFAULT_OUTPUT}")
    parser.add_argument("--recipe", type=Path, default=HERE / "recipe.yaml")
    parser.add_argument("--scale-steps", type=float, default=1.0, help="multiply every step count (quick trials)")
    args = parser.parse_args()
    recipe = yaml.safe_load(args.recipe.read_text())
    for stage in ("vae_training", "dit_training"):
        recipe[stage]["steps"] = max(1, round(recipe[stage]["steps"] * args.scale_steps))
    report = train(recipe, args.output)
    print(f"wrote {args.output} in {report['minutes']} min; final losses {report['final_loss']}")


if __name__ == "__main__":
    main()
