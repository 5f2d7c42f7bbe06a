"""Typed view of the per-family YAML files in this folder."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict

from configs.sampling import OmniDiffusionSamplingParams, SamplingValueError

CONFIG_DIR = Path(__file__).resolve().parent


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SizeLimits(_Strict):
    multiple_of: int
    min: int
    max: int

    def check_side(self, name: str, value: int) -> None:
        """Raise SamplingValueError naming the sizes that work when `value` is not one of them."""
        if value % self.multiple_of or not self.min <= value <= self.max:
            raise SamplingValueError(
                f"{name}={value} is not supported: height and width must be multiples of "
                f"{self.multiple_of} between {self.min} and {self.max} (for example {self.nearest(value)})",
                name,
            )

    def nearest(self, value: int) -> int:
        rounded = round(value / self.multiple_of) * self.multiple_of
        return max(self.min, min(self.max, rounded))


class TextLimit(_Strict):
    """How long a prompt may be, in tokens of the family's longest text encoder's `tokenizer`
    (a pipeline folder). Longer prompts are truncated by the pipeline (diffusers' behaviour for
    every family); a larger max_sequence_length is refused. rope_table: a transformer config key
    whose first entry bounds the caption positions (Z-Image: captions padded to 32, then the image)."""

    max_tokens: int
    tokenizer: str
    rope_table: str | None = None


class HeadLayout(_Strict):
    """Where a model's config keeps its attention shape (dotted keys reach nested configs)."""

    heads: str  # the number of query heads
    kv_heads: str | None = None  # the number of key/value heads (GQA); unset: as many as query heads
    head_dim: str | None = None  # head_dim ...
    width: str | None = None  # ... or the width, head_dim = width / heads


class AttentionRule(_Strict):
    """Attention modules matching `pattern` get these attributes set to this rank's values:
    heads, kv_heads, groups (query heads per KV head), width (heads x head_dim), kv_width."""

    pattern: str
    layout: str = "main"
    local: dict[str, Literal["heads", "kv_heads", "groups", "width", "kv_width"]]


class LayerRule(_Strict):
    """nn.Linear (or nn.Embedding, whose output is its embedding dim) modules matching `pattern`.

    style: colwise (outputs split), colwise_gather (outputs split, gathered whole after the layer:
    for small outputs like adaLN modulation and token embeddings), rowwise (inputs split, one
    all-reduce), packed_rowwise (inputs are cat([per-head part, evenly split part])).
    split: heads / kv_heads (by this rank's query / KV heads x head_dim), per_head (one feature per
    head), qkv (a fused [q; k; v] projection), even, heads+even (packed).
    """

    pattern: str
    style: Literal["colwise", "colwise_gather", "rowwise", "packed_rowwise"]
    split: Literal["heads", "kv_heads", "per_head", "qkv", "even", "heads+even"]
    layout: str = "main"
    optional: bool = False  # the pattern may match nothing (a variant of the model lacks it)


class BufferRule(_Strict):
    """A large table buffer (a position-embedding grid) split on its last dim; the output of the
    owning module's method `gathered` is gathered whole again."""

    pattern: str  # the buffer's full name, e.g. "pos_embed.pos_embed"
    gathered: str


class TensorParallelPlan(_Strict):
    layouts: dict[str, HeadLayout]
    attention: list[AttentionRule]
    layers: list[LayerRule]
    buffers: list[BufferRule] = []


class SequenceParallelPlan(_Strict):
    """Where the DiT's tokens are split over the Ulysses ranks and gathered again. Module paths are
    dotted names below the DiT ("" is the DiT itself, "blocks.*" every entry of a list, "blocks.0"
    and "blocks.-1" its first and last); every op between a split and its gather must treat tokens
    independently except attention, which the Ulysses all-to-all handles."""

    split_inputs: dict[str, dict[str, int]] = {}  # module -> {forward argument: token dim}
    split_outputs: dict[str, dict[int, int]] = {}  # module -> {output index (0 for a lone tensor): token dim}
    gather_outputs: dict[str, int] = {}  # module -> token dim of its output


class CfgParallelPlan(_Strict):
    """How a family's pipeline runs its guidance branches, so CFG parallelism can run them at once.

    separate_calls: true CFG calls the DiT twice per step (cond, then uncond) when
    true_cfg_scale > 1 and a negative prompt is given; the output has the shape of `hidden_states`.
    batched: the branches (and the images of a batch) are rows of one call; `batch_arguments` are
    the forward arguments (tensors or lists) whose first dimension is that batch.
    """

    branches: Literal["separate_calls", "batched"]
    batch_arguments: list[str] = []

    def calls_twice(self, true_cfg_scale: float | None, negative_prompt: str | None) -> bool:
        """Whether the pipeline makes a cond and an uncond DiT call per step (diffusers' `do_true_cfg`)."""
        return self.branches == "separate_calls" and (true_cfg_scale or 0) > 1 and negative_prompt is not None


class PreviewPlan(_Strict):
    """How the pipeline turns latents into pixels, for partial-image previews: `packed` latents are
    (batch, tokens, channels) and unpacked by the pipeline's `_unpack_latents`; `normalisation`
    undoes the VAE's latent scaling (scaling_factor/shift_factor, or per-channel latents_mean/std);
    `frames`: the VAE works on video (batch, channels, frames, height, width)."""

    packed: bool = False
    normalisation: Literal["scaling_shift", "mean_std"] = "scaling_shift"
    frames: bool = False


class QuantizationPlan(_Strict):
    """What `--quantization fp8|int8` turns to 1 byte a weight: the linear layers of these components,
    except those matching `keep` (small layers at the model's input and output, kept in the compute
    dtype as the published FP8 releases keep them). A GGUF file decides for itself, tensor by tensor."""

    components: list[str] = ["transformer"]
    keep: list[str] = []


class TinyRecipe(_Strict):
    """Numbers of the built-in tiny variant: component configs and sampling overrides."""

    model_config = ConfigDict(extra="allow", frozen=True)
    seed: int = 0
    defaults: OmniDiffusionSamplingParams = OmniDiffusionSamplingParams()
    transformer: dict[str, Any]

    def component(self, name: str) -> dict[str, Any]:
        return dict(getattr(self, name))


class FamilyConfig(_Strict):
    name: str
    pipeline_class: str
    transformer_class: str
    # image-edit: each input image is edited on its own; multi-image-edit: all condition one result
    task: Literal["text-to-image", "image-edit", "multi-image-edit"]
    defaults: OmniDiffusionSamplingParams
    tensor_parallel: TensorParallelPlan
    sequence_parallel: SequenceParallelPlan
    cfg_parallel: CfgParallelPlan
    # The DiT forward's arguments that hold one entry per row (image or guidance branch): continuous
    # scheduling concatenates them to merge calls; every other argument must be equal to merge.
    per_sample_arguments: list[str]
    preview: PreviewPlan = PreviewPlan()
    # Pipelines built from the loaded one (diffusers' from_pipe: the same weights) for edits of
    # another kind: "image-to-image" (an image, no mask) and "inpaint" (an image and a mask).
    edit_pipelines: dict[Literal["image-to-image", "inpaint"], str] = {}
    size: SizeLimits
    text: TextLimit
    # The fewest denoising steps the family's published scheduler handles (fewer give NaN sigmas).
    min_inference_steps: int = 1
    # Pixels on a side of one DiT token: every family's VAE is 8x down, then 2x2 patches (or packing).
    latent_patch_pixels: int = 16
    # Where the pipeline resizes each input image to about this many pixels before the DiT reads it
    # (Qwen-Image-Edit: 1024 x 1024, aspect kept, sides rounded to 32); elsewhere inputs take the output's size.
    edit_condition_area: int | None = None
    quantization: QuantizationPlan = QuantizationPlan()
    tiny: TinyRecipe

    @property
    def is_edit(self) -> bool:
        return self.task in ("image-edit", "multi-image-edit")

    @property
    def edits_images_together(self) -> bool:
        return self.task == "multi-image-edit"


@functools.cache
def load_all_families() -> dict[str, FamilyConfig]:
    families = {}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        if path.name in ("published.yaml", "text_encoders.yaml", "builtin.yaml"):
            continue
        family = FamilyConfig.model_validate(yaml.safe_load(path.read_text()))
        families[family.name] = family
    return families


@functools.cache
def load_text_encoder_plans() -> dict[str, TensorParallelPlan]:
    """transformers model class name -> its tensor-parallel plan (configs/text_encoders.yaml)."""
    entries = yaml.safe_load((CONFIG_DIR / "text_encoders.yaml").read_text())
    return {name: TensorParallelPlan.model_validate(plan) for name, plan in entries.items()}


def load_family(name: str) -> FamilyConfig:
    families = load_all_families()
    if name not in families:
        raise ValueError(f"unknown model family {name!r}; supported: {', '.join(families)}")
    return families[name]


def family_for_pipeline_class(pipeline_class: str) -> FamilyConfig:
    for family in load_all_families().values():
        if family.pipeline_class == pipeline_class:
            return family
    supported = ", ".join(f"{f.name} ({f.pipeline_class})" for f in load_all_families().values())
    raise ValueError(f"pipeline class {pipeline_class!r} is not supported; supported families: {supported}")


class BuiltinModel(_Strict):
    """A trained model the project ships (configs/builtin.yaml)."""

    description: str
    trained_by: str
    defaults: OmniDiffusionSamplingParams
    vocabulary: dict[str, list[str]] = {}  # word kind -> the words its captions use
    prompt_template: str | None = None  # a caption with {kind} for each vocabulary kind
    example_prompt: str | None = None


@functools.cache
def load_builtin_models() -> dict[str, BuiltinModel]:
    entries = yaml.safe_load((CONFIG_DIR / "builtin.yaml").read_text())
    return {name: BuiltinModel.model_validate(entry) for name, entry in entries.items()}


def builtin_model_entry(model: str) -> BuiltinModel | None:
    """The configs/builtin.yaml entry a "builtin/<name>" model name stands for; None for any other name."""
    prefix, _, name = model.partition("/")
    return load_builtin_models().get(name) if prefix == "builtin" else None


@functools.cache
def load_published_models() -> dict[str, dict[str, Any]]:
    """Hub id -> {"pipeline_class": ..., component name: [library, class, config]} (configs/published.yaml)."""
    entries = yaml.safe_load((CONFIG_DIR / "published.yaml").read_text())
    return {hub_id: entry for hub_id, entry in entries.items() if not hub_id.startswith("_")}
