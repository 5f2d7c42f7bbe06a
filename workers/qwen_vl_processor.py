"""Qwen2-VL processor for images only.

transformers' Qwen2VLProcessor also builds a video processor, which needs torchvision; the
Qwen-Image-Edit pipeline only ever passes images, so this subclass leaves the video side out.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs) -> "Qwen2VLImageOnlyProcessor":
        """Load a saved Qwen2VLProcessor folder (image processor + tokenizer), skipping video."""
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        return cls(image_processor=image_processor, tokenizer=tokenizer)
