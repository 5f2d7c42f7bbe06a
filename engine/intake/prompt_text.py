"""How long a model's prompts may be: its limit in tokens, and a prompt's count for the notice that
it was truncated (the pipelines truncate; the engine only says so)."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import transformers

from configs.families import FamilyConfig

logger = logging.getLogger(__name__)

# Z-Image pads a caption to a multiple of 32 positions on the DiT's first rotary axis (from 1) and
# puts the image at the next position: a table of n positions holds (n - 2) // 32 * 32 tokens.
_CAPTION_PADDING = 32


def max_text_tokens(family: FamilyConfig, path: Path) -> int:
    """The largest max_sequence_length this model runs: the family's pipeline limit, and where the
    DiT keeps caption positions in a table (Z-Image), what that table holds."""
    limit = family.text.max_tokens
    if family.text.rope_table is not None:
        positions = _transformer_config(path)[family.text.rope_table][0]
        limit = min(limit, (positions - 2) // _CAPTION_PADDING * _CAPTION_PADDING)
    return limit


@functools.cache
def _transformer_config(path: Path) -> dict:
    return json.loads((path / "transformer" / "config.json").read_text())


@functools.cache
def _tokenizer(folder: Path) -> transformers.PreTrainedTokenizerBase | None:
    try:
        return transformers.AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - a configs-only folder (--load-format dummy): nothing counted
        logger.info("prompt lengths are not counted: no tokenizer at %s (%s)", folder, type(exc).__name__)
        return None


def prompt_tokens(family: FamilyConfig, path: Path, prompt: str) -> int | None:
    """Tokens of `prompt` alone (the pipeline's template, if any, adds a few), or None if unknown."""
    tokenizer = _tokenizer(path / family.text.tokenizer)
    if tokenizer is None:
        return None
    return len(tokenizer(prompt, add_special_tokens=False).input_ids)
