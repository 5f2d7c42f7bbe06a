"""GGUF's block formats in torch: dequantizing rows of blocks on the device they live on, and
encoding Q8_0 / Q4_K for checkpoints this project writes (tests, benchmarks).

A GGUF tensor row is a run of blocks; each block codes `elements` weights in `nbytes` bytes. The
layouts are ggml's (k_quants / ggml-quants); gguf-py's numpy `dequantize` is the reference the tests
check these against. Written here, not taken from gguf-py, because its numpy code runs on the host
only and cannot encode the K formats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

PLAIN = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16,
         GGMLQuantizationType.BF16: torch.bfloat16}


@dataclass(frozen=True)
class BlockFormat:
    name: str
    elements: int  # weights per block
    nbytes: int  # bytes per block


def block_format(kind: GGMLQuantizationType) -> BlockFormat:
    elements, nbytes = GGML_QUANT_SIZES[kind]
    return BlockFormat(kind.name, elements, nbytes)


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte `start` of every block, as float32 [blocks, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit (scale, min) pairs of a Q4_K / Q5_K block from their 12 packed bytes."""
    packed = packed.to(torch.int32)
    low, high, extra = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([low & 63, (extra & 15) | ((low >> 6) << 4)], dim=1)
    mins = torch.cat([high & 63, (extra >> 4) | ((high >> 6) << 4)], dim=1)
    return scales.float(), mins.float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[blocks, 128] bytes -> [blocks, 8, 32]: per 32-byte chunk its low nibbles, then its high ones."""
    chunks = qs.reshape(qs.shape[0], 4, 1, 32).to(torch.int32)
    return torch.cat([chunks & 15, chunks >> 4], dim=2).reshape(qs.shape[0], 8, 32)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return _half(blocks, 0) * blocks[:, 2:34].contiguous().view(torch.int8).float()


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    scales, mins = _k_scales(blocks[:, 4:16])
    q = _nibbles(blocks[:, 16:144]).float()
    values = _half(blocks, 0)[:, :, None] * scales[:, :, None] * q - _half(blocks, 2)[:, :, None] * mins[:, :, None]
    return values.reshape(blocks.shape[0], 256)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    scales, mins = _k_scales(blocks[:, 4:16])
    high_bits = blocks[:, 16:48].to(torch.int32)[:, None, :] >> torch.arange(8, device=blocks.device)[None, :, None]
    q = (_nibbles(blocks[:, 48:176]) + 16 * (high_bits & 1)).float()
    values = _half(blocks, 0)[:, :, None] * scales[:, :, None] * q - _half(blocks, 2)[:, :, None] * mins[:, :, None]
    return values.reshape(blocks.shape[0], 256)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    count = blocks.shape[0]
    low = blocks[:, 0:128].reshape(count, 2, 2, 32).to(torch.int32)  # [half, first/second 32 bytes, 32]
    high = blocks[:, 128:192].reshape(count, 2, 1, 32).to(torch.int32)
    shifts = torch.arange(0, 8, 2, device=blocks.device).reshape(1, 1, 4, 1)
    high = (high >> shifts) & 3  # [count, 2, 4, 32]: bits for value groups 0..3 of each half
    low = torch.cat([low & 15, low >> 4], dim=2)  # groups 0,1 take low nibbles; 2,3 the high ones
    q = (low | (high << 4)) - 32
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    values = q.reshape(count, 16, 16).float() * scales[:, :, None] * _half(blocks, 208)[:, :, None]
    return values.reshape(count, 256)


def type_for_rows(in_features: int, kind: GGMLQuantizationType) -> GGMLQuantizationType | None:
    """`kind` where rows of `in_features` are whole blocks of it, else Q8_0 where they are whole
    Q8_0 blocks (as GGUF converters fall back), else None (the tensor stays plain)."""
    for candidate in (kind, GGMLQuantizationType.Q8_0):
        if candidate in PLAIN or in_features % block_format(candidate).elements == 0:
            return candidate
    return None


_DEQUANTIZERS = {
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q4_K: _q4_k,
    GGMLQuantizationType.Q5_K: _q5_k,
    GGMLQuantizationType.Q6_K: _q6_k,
}
SUPPORTED = tuple(_DEQUANTIZERS)


def dequantize(data: torch.Tensor, kind: GGMLQuantizationType, dtype: torch.dtype) -> torch.Tensor:
    """[rows, row bytes] uint8 -> [rows, row bytes / nbytes x elements] of `dtype`."""
    if kind in PLAIN:
        return data.view(PLAIN[kind]).to(dtype)
    form = block_format(kind)
    rows = data.shape[0]
    blocks = data.reshape(-1, form.nbytes)
    return _DEQUANTIZERS[kind](blocks).to(dtype).reshape(rows, -1)


# encoding ----------------------------------------------------------------------------------------
def quantize(weight: torch.Tensor, kind: GGMLQuantizationType) -> torch.Tensor:
    """[rows, columns] float -> [rows, row bytes] uint8 in `kind` (Q8_0 or Q4_K; F32/F16/BF16 as is)."""
    if kind in PLAIN:
        return weight.to(PLAIN[kind]).contiguous().view(torch.uint8)
    rows = weight.shape[0]
    form = block_format(kind)
    blocks = weight.float().reshape(-1, form.elements)
    encoded = {GGMLQuantizationType.Q8_0: _encode_q8_0, GGMLQuantizationType.Q4_K: _encode_q4_k}[kind](blocks)
    return encoded.reshape(rows, -1)


def _as_bytes(half: torch.Tensor) -> torch.Tensor:
    return half.to(torch.float16).reshape(-1, 1).contiguous().view(torch.uint8)


def _encode_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    scale = blocks.abs().amax(dim=1, keepdim=True) / 127
    q = torch.where(scale > 0, blocks / scale.clamp_min(1e-30), 0).round().clamp(-127, 127).to(torch.int8)
    return torch.cat([_as_bytes(scale), q.view(torch.uint8)], dim=1)


def _encode_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """Per 32-weight group: an offset (its min, at most 0) and a step, both as 6-bit multiples of the
    block's two float16 factors; the weights as 4-bit steps above the offset."""
    groups = blocks.reshape(-1, 8, 32)
    offset = (-groups.amin(dim=2)).clamp_min(0)
    step = (groups.amax(dim=2) + offset) / 15
    d = (step.amax(dim=1, keepdim=True) / 63).to(torch.float16).float()
    dmin = (offset.amax(dim=1, keepdim=True) / 63).to(torch.float16).float()
    scales = torch.where(d > 0, step / d.clamp_min(1e-30), 0).round().clamp(0, 63)
    mins = torch.where(dmin > 0, offset / dmin.clamp_min(1e-30), 0).round().clamp(0, 63)
    unit, shift = (d * scales)[:, :, None], (dmin * mins)[:, :, None]
    q = torch.where(unit > 0, (groups + shift) / unit.clamp_min(1e-30), 0).round().clamp(0, 15).to(torch.int32)
    scales, mins = scales.to(torch.int32), mins.to(torch.int32)
    packed = torch.cat([
        scales[:, :4] | ((scales[:, 4:] >> 4) << 6),
        mins[:, :4] | ((mins[:, 4:] >> 4) << 6),
        (scales[:, 4:] & 15) | ((mins[:, 4:] & 15) << 4),
    ], dim=1).to(torch.uint8)
    pairs = q.reshape(-1, 4, 2, 32)
    nibbles = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).to(torch.uint8).reshape(-1, 128)
    return torch.cat([_as_bytes(d), _as_bytes(dmin), packed, nibbles], dim=1)
