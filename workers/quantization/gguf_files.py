"""GGUF files of a DiT: reading this rank's slices of its tensors (gguf's memory-mapped reader, so
only the slice is read from disk), and writing one from a float state dict (tests, benchmarks).

Tensor names are the diffusers model's own (as Qwen-Image's GGUF releases have them) or the
model's original ones (FLUX.1's and Z-Image's, read through diffusers' converter); a
`model.diffusion_model.` prefix, as ComfyUI writes it, is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from workers.quantization import gguf_blocks
from workers.quantization.original_names import RowCheckpoint
from workers.shard_slices import ShardSlices

PREFIXES = ("model.diffusion_model.",)


def find_gguf(directory: Path, file: str | None = None) -> Path | None:
    """The GGUF file a component is read from: `file` when given, else the one in `directory`."""
    if file:
        return Path(file)
    found = sorted(directory.glob("*.gguf"))
    if len(found) > 1:
        raise ValueError(f"{directory} holds {len(found)} .gguf files; name one with --transformer-file")
    return found[0] if found else None


class GgufCheckpoint(RowCheckpoint):
    """Model tensor name -> its slice, as numbers (`read`) or as stored (`read_blocks`: uint8 block
    rows for quantized types). A file without the model's names (`expected`) is read in its
    original layout through diffusers' converter for `class_name`."""

    def __init__(self, path: Path, expected: set[str] = frozenset(), class_name: str = ""):
        self.path = path
        self._stored = {}
        for tensor in GGUFReader(path).tensors:
            name = next((tensor.name.removeprefix(p) for p in PREFIXES if tensor.name.startswith(p)), tensor.name)
            self._stored[name] = tensor
        self._set_layout(expected, class_name)

    def _stored_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(int(n) for n in reversed(t.shape)) for name, t in self._stored.items()}

    def gguf_type(self, name: str) -> GGMLQuantizationType:
        return self._type_of(self.stored_name(name))

    def _type_of(self, stored: str) -> GGMLQuantizationType:
        return GGMLQuantizationType(self._stored[stored].tensor_type)

    def read(self, name: str, slices: ShardSlices | None) -> torch.Tensor:
        """The slice of tensor `name` as numbers (a tensor stored in blocks that loads as a plain
        parameter is decoded)."""
        if self.gguf_type(name) in gguf_blocks.PLAIN:
            return self.read_rows(name, slices)
        rows = self.read_rows(name, slices if slices is not None and slices.dim == 0 else None)
        dense = gguf_blocks.dequantize(rows, self.gguf_type(name), torch.float32)
        if slices is None or slices.dim == 0:
            return dense
        return torch.cat([dense[:, start:end] for start, end in slices.ranges], dim=1)

    def read_blocks(self, name: str, slices: ShardSlices | None) -> torch.Tensor:
        """The slice of tensor `name` as stored: elements for F32/F16/BF16, bytes of block rows else."""
        return self.read_rows(name, slices)

    def _read_stored(self, stored: str, start: int, end: int, columns: ShardSlices | None) -> torch.Tensor:
        data = self._stored[stored].data[start:end]
        bf16 = self._type_of(stored) == GGMLQuantizationType.BF16  # numpy has no bfloat16: rows of bytes
        if columns is not None:  # on the last dim, bytes of BF16 elements two by two
            width = 2 if bf16 and columns.dim == data.ndim - 1 else 1
            index = [slice(None)] * data.ndim
            parts = []
            for a, b in columns.ranges:
                index[columns.dim] = slice(width * a, width * b)
                parts.append(data[tuple(index)])
            data = np.concatenate(parts, axis=columns.dim)
        tensor = torch.from_numpy(np.array(data))  # a copy: the memory map stays read-only
        return tensor.view(torch.bfloat16) if bf16 else tensor

    def order(self, name: str) -> tuple:
        return (str(self.path), int(self._stored[self.stored_name(name)].data_offset))

    def close(self) -> None:
        self._stored.clear()  # the memory map goes with the last reference


TypeChooser = Callable[[str, torch.Tensor], GGMLQuantizationType]


def write_model_gguf(model: torch.nn.Module, path: Path, kind: GGMLQuantizationType,
                     keep: Callable[[str], bool] = lambda name: False) -> Path:
    """A model's weights as a GGUF file the way converters lay one out: every linear weight in
    `kind`, or Q8_0 where its rows are not whole `kind` blocks, or F32 where not even that (and
    where `keep(layer name)`); every other tensor F32."""
    linear = {f"{name}.weight": module.in_features for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and not keep(name)}

    def choose(name: str, tensor: torch.Tensor) -> GGMLQuantizationType:
        chosen = gguf_blocks.type_for_rows(linear[name], kind) if name in linear else None
        return chosen or GGMLQuantizationType.F32

    return write_gguf(path, {name: t.detach().float() for name, t in model.state_dict().items()}, choose)


def write_gguf(path: Path, state_dict: dict[str, torch.Tensor], choose: TypeChooser) -> Path:
    """`state_dict` as a GGUF file, each tensor in the type `choose(name, tensor)` gives."""
    writer = GGUFWriter(str(path), arch="ditserve")
    for name, tensor in state_dict.items():
        kind = choose(name, tensor)
        if kind in gguf_blocks.PLAIN and kind != GGMLQuantizationType.BF16:
            writer.add_tensor(name, tensor.to(gguf_blocks.PLAIN[kind]).numpy())
        else:
            writer.add_tensor(name, gguf_blocks.quantize(tensor.reshape(tensor.shape[0], -1), kind).numpy(),
                              raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def dequantized_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file as float32, decoded by gguf's own numpy code (the reference)."""
    from gguf.quants import dequantize

    return {name: torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(
                [int(n) for n in reversed(t.shape)])
            for t in GGUFReader(path).tensors
            for name in [t.name]}
