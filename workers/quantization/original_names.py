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


def has_converter(class_name: str) -> bool:
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    return SINGLE_FILE_LOADABLE_CLASSES.get(class_name, {}).get("checkpoint_mapping_fn") is not None


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
    except (NotImplementedError, KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:
        raise ValueError(f"the original-layout names cannot be mapped to {class_name}'s: {exc!r}") from None
    return {name: rows for name, rows in converted.items() if isinstance(rows, Rows)}


SCALE_SUFFIXES = ("weight_scale", "scale_weight")  # FP8 scales: compressed-tensors' / ComfyUI's "scaled fp8"


class RowCheckpoint:
    """A checkpoint read by model tensor names: its stored names, or for a file in the model's
    original layout (it lacks the model's names), rows of stored tensors as diffusers' converter for
    the model class lays them out. Subclasses say how to read and describe stored tensors."""

    def _set_layout(self, expected: set[str], class_name: str) -> None:
        """`expected`: the model's parameter names. A checkpoint that lacks some is read in the
        original layout when diffusers' converter for `class_name` maps it onto all of them (else
        as stored, and the loader names what is missing)."""
        self._shapes = shapes = self._stored_shapes()
        self._layout = {name: Rows(((name, 0, shape[0] if shape else 1),), tuple(shape[1:]))
                        for name, shape in shapes.items()}
        if not expected <= set(shapes) and has_converter(class_name):
            try:
                converted = diffusers_layout(class_name, {n: s for n, s in shapes.items() if s})
            except ValueError:
                return
            if expected <= set(converted):
                self._layout = converted

    # what a subclass provides
    def _stored_shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def _read_stored(self, stored: str, start: int, end: int, columns) -> torch.Tensor:
        """Rows [start, end) of a stored tensor (a 0-dim one whole), sliced as `columns` says on
        another dimension."""
        raise NotImplementedError

    def order(self, name: str) -> tuple:
        """Where tensor `name` starts in the files: reading in this order reads them front to back."""
        raise NotImplementedError

    def close(self) -> None:
        """Let go of the open files."""

    # reading by model names
    def __contains__(self, name: str) -> bool:
        return name in self._layout

    def stored_name(self, name: str) -> str:
        return self._layout[name].parts[0][0]

    def read_rows(self, name: str, slices) -> torch.Tensor:
        """This slice of tensor `name` as stored (rows picked from the stored tensors)."""
        rows = self._layout[name]
        if self._shapes[rows.parts[0][0]] == ():
            return self._read_stored(rows.parts[0][0], 0, 1, None)  # a 0-dim tensor, whole
        if slices is not None and slices.dim == 0:
            parts = [part for start, end in slices.ranges for part in rows.rows(start, end).parts]
            columns = None
        else:
            parts, columns = rows.parts, slices
        pieces = [self._read_stored(stored, start, end, columns) for stored, start, end in parts]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def scale_of(self, name: str) -> tuple[Rows, bool] | None:
        """FP8 weight `name`'s scales as rows of the stored scale tensors, and whether they are
        per output channel; None when it has none (scale 1)."""
        shapes, parts = self._shapes, []
        for stored, start, end in self._layout[name].parts:
            base = stored.removesuffix(".weight")
            key = next((f"{base}.{suffix}" for suffix in SCALE_SUFFIXES if f"{base}.{suffix}" in shapes), None)
            if key is None:
                return None
            parts.append((key, start, end))
        per_channel = torch.Size(shapes[parts[0][0]]).numel() > 1
        if per_channel:
            return Rows(tuple(parts), ()), True
        if len({key for key, _, _ in parts}) > 1:
            raise ValueError(f"{name} joins rows of tensors with different per-tensor FP8 scales")
        return Rows(((parts[0][0], 0, 1),), ()), False

    def read_scale(self, name: str, slices) -> torch.Tensor:
        rows, per_channel = self.scale_of(name)
        if not per_channel:
            return self._read_stored(rows.parts[0][0], 0, 1, None).float().reshape(())
        if slices is not None and slices.dim == 0:
            rows = Rows(tuple(part for start, end in slices.ranges for part in rows.rows(start, end).parts), ())
        return torch.cat([self._read_stored(key, start, end, None).float().reshape(-1)
                          for key, start, end in rows.parts])
