"""Context parallelism for packed (THD) sequences: which tokens a CP rank holds, and gathering
per-token tensors back into the packed order.

Megatron's load-balanced layout (the one Transformer Engine's attention and megatron's THD RoPE
expect): every packed sequence, its length a multiple of 2 x CP, is cut into 2 x CP equal chunks
and CP rank r holds chunks r and 2 x CP - 1 - r, so every rank gets the same share of causal
attention work. A rank's tokens are its chunks of every sequence, in sequence order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


class ContextParallelError(ValueError):
    """Packed sequences that cannot be split over the context-parallel group."""


def shard_positions(cu_seqlens: Sequence[int], cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions in the packed ``[T]`` sequence held by ``cp_rank``, in its local order."""
    bounds = [int(x) for x in cu_seqlens]
    pieces = []
    for a, b in zip(bounds, bounds[1:]):
        length = b - a
        if length % (2 * cp_size):
            raise ContextParallelError(
                f"packed sequence of {length} tokens (at {a}) is not a multiple of 2 x "
                f"context-parallel size {cp_size}")
        chunk = length // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            pieces.append(torch.arange(a + c * chunk, a + (c + 1) * chunk))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def gathered_order(cu_seqlens: Sequence[int], cp_size: int) -> torch.Tensor:
    """``inverse`` such that ``torch.cat(ranks' local tensors)[inverse]`` is the packed order."""
    order = torch.cat([shard_positions(cu_seqlens, cp_size, r) for r in range(cp_size)])
    return torch.argsort(order)


class _GatherCP(torch.autograd.Function):
    """All-gather along dim 0 over the CP group. Backward with ``reduce_grad``: every rank's
    output feeds its own loss, so the gradient of a rank's slice is the sum over ranks
    (all-reduce, then the slice); without it only this rank's slice of the gradient, no
    reduction: for values every CP rank feeds into the same (replicated) loss, whose ranks'
    gradients the data-parallel reduction over DP x CP then sums."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group, reduce_grad: bool) -> torch.Tensor:
        ctx.group, ctx.reduce_grad = group, reduce_grad
        ctx.rank = dist.get_rank(group)
        ctx.size = local.shape[0]
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.reduce_grad:
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size], None, None


def gather_packed(local: torch.Tensor, cu_seqlens: Sequence[int], group, *,
                  reduce_grad: bool) -> torch.Tensor:
    """This rank's ``[t, ...]`` tokens → the packed ``[T, ...]`` of the whole CP group.

    ``reduce_grad``: the gradient of the result is summed over the group (keys and values that
    every rank's queries attend to); otherwise each rank keeps its own slice of it (per-token
    log-probs of a loss that every CP rank computes whole)."""
    size = dist.get_world_size(group)
    gathered = _GatherCP.apply(local, group, reduce_grad)
    return gathered[gathered_order(cu_seqlens, size).to(local.device)]
