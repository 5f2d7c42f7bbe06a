"""Finding a tensor's or a layer's place in a module tree by its dotted name."""

from __future__ import annotations

from torch import nn


def owner_of(model: nn.Module, dotted_name: str) -> tuple[nn.Module, str]:
    """The module that holds `dotted_name` ("blocks.0.attn.to_q.weight") and the attribute it holds it as."""
    owner_name, _, attribute = dotted_name.rpartition(".")
    return (model.get_submodule(owner_name) if owner_name else model), attribute
