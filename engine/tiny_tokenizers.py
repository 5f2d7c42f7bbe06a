"""Tokenizers for the tiny models, built from Python objects (no files, no network).

They cover every byte with no merges, so any prompt tokenises; that is all a randomly
initialised text encoder needs.
"""

from __future__ import annotations

from tokenizers import pre_tokenizers
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


def build_qwen_tokenizer(chat_template: bool = False) -> Qwen2Tokenizer:
    vocab = {symbol: index for index, symbol in enumerate(_byte_alphabet())}
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=4096)
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
