"""GGUF files in a model's original layout (ComfyUI's and city96's FLUX.1 and Z-Image files keep
Black Forest Labs' and Tongyi's names, with fused q/k/v) read as the diffusers model's tensors.

diffusers' own single-file converter for the DiT class does the renaming: it is run on `Rows`
placeholders instead of tensors, so its chunks, splits and concatenations along dim 0 are recorded
as row ranges of the stored tensors rather than computed. Each diffusers tensor then reads only its
rows (and this rank's slice of them) from the memory map, still quantized: GGUF blocks run along
rows, so whole rows can be taken from a fused tensor without decoding it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Part = tuple[str, int, int]  # (stored name, first row, end row)


@dataclass(frozen=True)
class Rows:
    """A tensor made of rows of stored tensors, stacked along dim 0."""

    parts: tuple[Part, ...]
    tail: tuple[int, ...]  # the sizes of the other dims

    @property
    def shape(self) -> torch.Size:
        return torch.Size((sum(end - start for _, start, end in self.parts), *self.tail))

    def dim(self) -> int:
        return 1 + len(self.tail)

    def rows(self, start: int, end: int) -> Rows:
        """Rows [start, end) of this tensor, as parts of the stored ones."""
        picked, offset = [], 0
        for name, first, last in self.parts:
            low, high = max(start, offset), min(end, offset + last - first)
            if low < high:
                picked.append((name, first + low - offset, first + high - offset))
            offset += last - first
        return Rows(tuple(picked), self.tail)

    def split(self, sizes, dim: int = 0) -> tuple[Rows, ...]:
        _rows_only(dim)
        sizes = [sizes] * -(-self.shape[0] // sizes) if isinstance(sizes, int) else sizes
        bounds, start = [], 0
        for size in sizes:
            bounds.append(self.rows(start, min(start + size, self.shape[0])))
            start += size
        return tuple(bounds)

    def chunk(self, chunks: int, dim: int = 0) -> tuple[Rows, ...]:
        return self.split(-(-self.shape[0] // chunks), dim)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.cat:
            tensors, dim = args[0], kwargs.get("dim", args[1] if len(args) > 1 else 0)
            _rows_only(dim)
            return Rows(tuple(part for tensor in tensors for part in tensor.parts), tensors[0].tail)
        if func in (torch.chunk, torch.Tensor.chunk):
            return args[0].chunk(*args[1:], **kwargs)
        if func in (torch.split, torch.Tensor.split):
            return args[0].split(*args[1:], **kwargs)
        raise NotImplementedError(f"{func.__name__}: the converter does more than pick rows")


def _rows_only(dim: int) -> None:
    if dim != 0:
        raise NotImplementedError("the converter splits or joins along a dimension other than rows")


def diffusers_layout(class_name: str, stored: dict[str, tuple[int, ...]]) -> dict[str, Rows]:
    """Diffusers tensor name -> its rows among `stored` (name -> shape), by diffusers' converter for
    `class_name`; ValueError when diffusers has none or it needs more than rows."""
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    converter = SINGLE_FILE_LOADABLE_CLASSES.get(class_name, {}).get("checkpoint_mapping_fn")
    if converter is None:
        raise ValueError(f"diffusers has no single-file converter for {class_name}")
    placeholders = {name: Rows(((name, 0, shape[0]),), tuple(shape[1:])) for name, shape in stored.items()}
    try:
        converted = converter(placeholders)
    except (NotImplementedError, KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"the original-layout names cannot be mapped to {class_name}'s: {exc!r}") from None
    return {name: rows for name, rows in converted.items() if isinstance(rows, Rows)}
