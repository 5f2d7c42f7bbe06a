"""Ulysses sequence parallelism: each rank of a Ulysses group holds a slice of the DiT's tokens.

Every op of a transformer block treats tokens independently except attention. So the family's
plan (configs/<family>.yaml `sequence_parallel:`) splits the tokens (and the per-token tables:
rotary embeddings, masks) where they enter the blocks and gathers them where they leave, and
attention runs on all tokens for a share of the heads: one all-to-all turns (all heads, my tokens)
into (my heads, all tokens) for q, k and v, and one turns the output back.

Attention is caught at `torch.nn.functional.scaled_dot_product_attention`, the one call every
family's processors end in (diffusers' native backend and SD3's processor alike), so no processor
is rewritten: a rank with a Ulysses group replaces that function with one that, during the DiT's
forward only, runs Ulysses attention (the text encoders' attention stays plain). A plain function
rather than a TorchFunctionMode: torch.compile traces it inside a block, where a mode would split
the graph at every tensor method written in Python (`Tensor.unflatten`). Under compile the
exchange is one op, `ditserve::ulysses_attention`.

The gathered sequence is the ranks' slices in rank order, not the model's order; attention is
invariant to the order of keys and equivariant in queries, and a key mask is gathered in the same
order, so the result is the same.

Uneven splits are allowed everywhere: tokens (even_partition; a rank may hold none) and heads
(30 heads over 4 ranks: 8/8/7/7).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from configs.families import SequenceParallelPlan
from workers.parallel import parallel_state

AXIS = "ulysses"
_plain_attention = F.scaled_dot_product_attention
_in_dit_forward = [False]  # the hooks and the replaced scaled_dot_product_attention act only while true


def shares(size: int, parts: int) -> list[int]:
    """`size` split into `parts` as evenly as possible, the first ones larger; zeros allowed."""
    base, extra = divmod(size, parts)
    return [base + (part < extra) for part in range(parts)]


def split_tokens(value: Any, dim: int) -> Any:
    """This rank's slice of `value` along `dim` (tensors only; anything else passes through)."""
    if not isinstance(value, torch.Tensor):
        return value
    parts = shares(value.shape[dim], parallel_state.size_of(AXIS))
    index = parallel_state.rank_in(AXIS)
    return value.narrow(dim, sum(parts[:index]), parts[index])


def gather_tokens(value: torch.Tensor, dim: int) -> torch.Tensor:
    slices = parallel_state.all_gather([value.contiguous()], AXIS)
    return torch.cat([member[0] for member in slices], dim=dim)


def ulysses_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                      enable_gqa=False) -> torch.Tensor:
    """scaled_dot_product_attention on (batch, heads, my tokens, head_dim) inputs, computed over the
    tokens of the whole group for a share of the heads."""
    if is_causal:
        raise NotImplementedError("Ulysses attention over a sequence split in rank order cannot be causal")
    size, me = parallel_state.size_of(AXIS), parallel_state.rank_in(AXIS)
    kv_shares = shares(key.shape[1], size)
    per_kv = query.shape[1] // key.shape[1]
    q_shares = [share * per_kv for share in kv_shares]

    def heads_to_tokens(tensor: torch.Tensor, head_shares: list[int]) -> list[torch.Tensor]:
        return parallel_state.all_to_all([p.contiguous() for p in tensor.split(head_shares, dim=1)], AXIS)

    local_tokens = query.shape[2]
    received = heads_to_tokens(query, q_shares)
    token_counts = [piece.shape[2] for piece in received]  # every member's slice length, in member order
    query = torch.cat(received, dim=2)
    key, value = (torch.cat(heads_to_tokens(t, kv_shares), dim=2) for t in (key, value))
    if attn_mask is not None:
        if attn_mask.shape[-2] != 1 or (attn_mask.dim() == 4 and attn_mask.shape[1] != 1):
            raise NotImplementedError(f"Ulysses attention supports key masks only, not {tuple(attn_mask.shape)}")
        attn_mask = gather_tokens(attn_mask, dim=-1)
    out = _plain_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale,
                           enable_gqa=enable_gqa)
    pieces = [piece.contiguous() for piece in out.split(token_counts, dim=2)]
    assert pieces[me].shape[2] == local_tokens
    return torch.cat(parallel_state.all_to_all(pieces, AXIS), dim=1)


@torch.library.custom_op("ditserve::ulysses_attention", mutates_args=())
def _ulysses_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attn_mask: torch.Tensor | None, dropout_p: float, scale: float | None,
                          enable_gqa: bool) -> torch.Tensor:
    """Ulysses attention as one node of a compiled graph. The all-to-alls inside exchange pieces
    whose sizes depend on the other ranks' token counts, which tracing cannot see; the output's
    shape is the query's (with the value's head size), which it can."""
    return ulysses_attention(query, key, value, attn_mask, dropout_p, scale=scale, enable_gqa=enable_gqa)


@_ulysses_attention_op.register_fake
def _(query, key, value, attn_mask, dropout_p, scale, enable_gqa):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def _attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False) -> torch.Tensor:
    """What `torch.nn.functional.scaled_dot_product_attention` is on a Ulysses rank."""
    if not _in_dit_forward[0]:
        return _plain_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                scale=scale, enable_gqa=enable_gqa)
    if not torch.compiler.is_compiling():
        return ulysses_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if is_causal:
        raise NotImplementedError("Ulysses attention over a sequence split in rank order cannot be causal")
    return torch.ops.ditserve.ulysses_attention(query, key, value, attn_mask, dropout_p, scale, enable_gqa)


def _modules(root: nn.Module, path: str) -> list[nn.Module]:
    """The modules a plan path names: "" (root), "a.b", "blocks.*", "blocks.0", "blocks.-1"."""
    modules = [root]
    for part in path.split(".") if path else []:
        if part == "*":
            modules = [child for module in modules for child in module.children()]
        elif part.lstrip("-").isdigit():
            modules = [module[int(part)] for module in modules]
        else:
            modules = [getattr(module, part) for module in modules]
    return modules


def _split_arguments(signature: inspect.Signature, args: tuple, kwargs: dict, dims: dict[str, int]):
    bound = signature.bind(*args, **kwargs)
    for name, dim in dims.items():
        if name in bound.arguments:
            bound.arguments[name] = split_tokens(bound.arguments[name], dim)
    return bound.args, bound.kwargs


def _split_output(output: Any, dims: dict[int, int]) -> Any:
    if isinstance(output, torch.Tensor):
        return split_tokens(output, dims[0])
    return type(output)(split_tokens(item, dims[i]) if i in dims else item for i, item in enumerate(output))


def install(dit: nn.Module, plan: SequenceParallelPlan) -> Callable[..., Any]:
    """Hook the plan's split and gather points into `dit` (hooks act only inside `run`) and return
    the function that runs one forward sequence-parallel."""
    for path, dims in plan.split_inputs.items():
        if not path:
            continue
        for module in _modules(dit, path):
            signature = inspect.signature(module.forward)

            def split_inputs(module, args, kwargs, signature=signature, dims=dims):
                return _split_arguments(signature, args, kwargs, dims) if _in_dit_forward[0] else None

            module.register_forward_pre_hook(split_inputs, with_kwargs=True)
    for path, dims in plan.split_outputs.items():
        for module in _modules(dit, path):
            module.register_forward_hook(
                lambda module, args, output, dims=dims: _split_output(output, dims) if _in_dit_forward[0] else None)
    for path, dim in plan.gather_outputs.items():
        for module in _modules(dit, path):
            module.register_forward_hook(
                lambda module, args, output, dim=dim: gather_tokens(output, dim) if _in_dit_forward[0] else None)
    F.scaled_dot_product_attention = _attention
    root_dims = plan.split_inputs.get("", {})

    def run(forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if root_dims:
            args, kwargs = _split_arguments(inspect.signature(forward), args, kwargs, root_dims)
        _in_dit_forward[0] = True
        try:
            return forward(*args, **kwargs)
        finally:
            _in_dit_forward[0] = False

    return run
