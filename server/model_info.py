"""What the server tells clients about its model beyond an id: the extra fields of its /v1/models
entry (for the playground and tools that size requests) and GET /v1/model_info (SGLang's route)."""

from __future__ import annotations

from engine import ResolvedModel, well_served_pixels
from server.settings import ServerSettings


def model_fields(settings: ServerSettings, model: ResolvedModel | None) -> dict:
    """Family, defaults and size limits of the served model (none while it is not loaded); for a
    built-in model also the words it was trained on and how its captions put them together."""
    if model is None:
        return {}
    family, defaults = model.family, model.defaults
    good = well_served_pixels(model)
    builtin = settings.builtin
    words = {"vocabulary": builtin.vocabulary, "prompt_template": builtin.prompt_template,
             "example_prompt": builtin.example_prompt} if builtin else {}
    return {
        "family": family.name,
        "task": family.task,
        "default_size": f"{defaults.width}x{defaults.height}" if defaults.width and defaults.height else None,
        "default_steps": defaults.num_inference_steps,
        "size_limits": {"min_side": family.size.min, "max_side": family.size.max,
                        "multiple_of": family.size.multiple_of},
        # larger or smaller images than these pixel counts get a warning header: far from the training size
        "trained_pixels": {"min": good[0], "max": good[1]} if good else None,
        **words,
    }


def model_info(settings: ServerSettings, model: ResolvedModel | None) -> dict:
    """SGLang's /v1/model_info shape (model_path, tokenizer_path, is_generation, ...) plus model_fields.
    model_path is the folder the weights were read from (a name `model` accepts too): SGLang's
    benchmark client reads the task from a local folder and asks the hub only about other names."""
    tokenizer = str(model.path / model.family.text.tokenizer) if model is not None else None
    return {"model_path": str(model.path) if model is not None else settings.model, "model": settings.model,
            "tokenizer_path": tokenizer, "served_model_name": settings.served_model_name,
            "is_generation": True, "has_image_understanding": bool(model and model.family.is_edit),
            "model_type": model.family.name if model else None,
            "architectures": [model.family.pipeline_class] if model else [], **model_fields(settings, model)}
