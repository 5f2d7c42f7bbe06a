"""Tokenizers for the tiny models, built from Python objects (no files, no network).

They cover every byte, so any prompt tokenises; that is all a randomly initialised text encoder
needs. A trained model passes its caption corpus to get whole-word tokens on top.
"""

from __future__ import annotations

import json
from typing import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer, Qwen2Tokenizer, T5Tokenizer

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The smallest chat template Z-Image's pipeline accepts (it passes enable_thinking=True).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_alphabet() -> list[str]:
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _byte_level_merges(corpus: Iterable[str], max_merges: int) -> list[tuple[str, str]]:
    """Byte-level BPE merges learnt from `corpus` (up to whole words, as Qwen's pre-tokenizer splits)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + max_merges, initial_alphabet=alphabet)
    bpe.train_from_iterator(corpus, trainer)
    return [tuple(merge) for merge in json.loads(bpe.to_str())["model"]["merges"]]


def build_qwen_tokenizer(
    chat_template: bool = False, corpus: Iterable[str] | None = None, max_merges: int = 1000
) -> Qwen2Tokenizer:
    vocab = {symbol: index for index, symbol in enumerate(_byte_alphabet())}
    merges = _byte_level_merges(corpus, max_merges) if corpus is not None else []
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=4096)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    if chat_template:
        tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def build_clip_tokenizer() -> CLIPTokenizer:
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for symbol in alphabet + [s + "</w>" for s in alphabet] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab[symbol] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_t5_tokenizer() -> T5Tokenizer:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    printable = [chr(c) for c in range(33, 127)]
    pieces += [(c, -2.0) for c in printable] + [("\u2581" + c, -1.5) for c in printable]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
