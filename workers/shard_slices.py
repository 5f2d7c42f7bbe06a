"""Which part of a full checkpoint tensor a rank's tensor holds: the record the TP layers write and
the loader reads (a leaf, so the quantized weights can keep one too)."""

from __future__ import annotations

from dataclasses import dataclass

Ranges = list[tuple[int, int]]


@dataclass(frozen=True)
class ShardSlices:
    dim: int
    ranges: Ranges

    @property
    def width(self) -> int:
        return sum(end - start for start, end in self.ranges)


def shard_slices(tensor) -> ShardSlices | None:
    """The part of the full checkpoint tensor `tensor` holds; None when it holds all of it."""
    return getattr(tensor, "_shard_slices", None)


def set_shard_slices(tensor, slices: ShardSlices | None) -> None:
    tensor._shard_slices = slices
