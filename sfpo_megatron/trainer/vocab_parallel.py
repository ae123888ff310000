"""Per-token log-prob of target tokens and per-token entropy from vocab-parallel logits.

Megatron's output layer leaves logits split over the tensor-parallel group: ``[s, b, V/tp]`` on
each rank. Gathering the full vocab (150k+ columns) per token is what we avoid. With z the
temperature-scaled logits and m the global max,

    log p(y) = (z_y − m) − log Σ_v e^{z_v − m}
    H        = log Σ_v e^{z_v − m} − Σ_v p_v (z_v − m)

needs only three per-token scalars reduced over the TP group: max (MAX), and Σ e^{z−m}, Σ e^{z−m}
(z−m), z_y (SUM, one fused all-reduce). The backward needs no communication: every TP rank holds the
same upstream gradients (the loss is replicated across TP), and the local gradient is analytic,

    ∂log p(y)/∂z_v = 1[v = y] − p_v,        ∂H/∂z_v = p_v (E_p[z] − z_v),

with p recomputed from the saved shifted logits and log-sum-exp. The vocab range of each rank comes
from megatron's ``VocabUtility`` and the group from ``parallel_state``, as in megatron's
``vocab_parallel_cross_entropy`` (used here for the log-prob-only path).

Temperature: the rollout engine samples from softmax(logits / T), so log-probs and entropy for
the PPO ratio must use the same T; the division happens before the autograd Function, so its
gradient is ordinary autograd.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.utils import VocabUtility

from sfpo_megatron.errors import UserError


class VocabParallelError(UserError):
    """Bad logits / target shapes or settings."""


def default_tp_group() -> dist.ProcessGroup | None:
    """megatron's tensor-parallel group when model parallelism is initialised, else None."""
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


def _group_rank_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 logits are reduced in fp32 (as megatron's cross entropy); fp64 stays fp64.
    return torch.promote_types(dtype, torch.float32)


class _LogProbEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, target, group, vocab_start, vocab_end):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        if z.shape[-1] > 0:
            logits_max = z.amax(dim=-1)
        else:  # a rank whose shard is all vocab padding
            logits_max = torch.full(z.shape[:-1], float("-inf"), dtype=z.dtype, device=z.device)
        if group is not None:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = z - logits_max.unsqueeze(-1)

        target_mask = (target < vocab_start) | (target >= vocab_end)
        local_target = (target - vocab_start).masked_fill(target_mask, 0)
        if z.shape[-1] > 0:
            predicted = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
            predicted = predicted.masked_fill(target_mask, 0.0)
        else:
            predicted = torch.zeros_like(logits_max)
        exp = torch.exp(shifted)
        sum_exp = exp.sum(dim=-1)
        # In place: these are [tokens, V/tp] fp32 tensors, each one a large allocation.
        sum_exp_z = exp.mul_(shifted).sum(dim=-1)
        del exp
        sums = torch.stack([predicted, sum_exp, sum_exp_z])
        if group is not None:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        predicted, sum_exp, sum_exp_z = sums.unbind(0)
        log_sum_exp = torch.log(sum_exp)
        mean_z = sum_exp_z / sum_exp  # E_p[z - m]
        ctx.save_for_backward(shifted, log_sum_exp, mean_z, local_target, target_mask)
        return predicted - log_sum_exp, log_sum_exp - mean_z

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):  # type: ignore[override]
        shifted, log_sum_exp, mean_z, local_target, target_mask = ctx.saved_tensors
        if grad_logprob is None and grad_entropy is None:
            return None, None, None, None, None
        probs = (shifted - log_sum_exp.unsqueeze(-1)).exp_()
        if grad_entropy is not None:
            grad = (mean_z.unsqueeze(-1) - shifted).mul_(probs).mul_(grad_entropy.unsqueeze(-1))
            if grad_logprob is not None:
                grad.addcmul_(probs, grad_logprob.unsqueeze(-1), value=-1.0)
        else:
            grad = probs.mul_(-grad_logprob.unsqueeze(-1))
        if grad_logprob is not None:
            if shifted.shape[-1] > 0:
                on_rank = (~target_mask).to(grad.dtype) * grad_logprob
                grad.scatter_add_(-1, local_target.unsqueeze(-1), on_rank.unsqueeze(-1))
        return grad, None, None, None, None


def _prepare(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    vocab_size: int | None,
    group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, int, int]:
    if vocab_parallel_logits.shape[:-1] != target.shape:
        raise VocabParallelError(
            f"logits {tuple(vocab_parallel_logits.shape)} and target {tuple(target.shape)} must "
            "share the leading dims ([s, b, V/tp] and [s, b])")
    if not temperature > 0:
        raise VocabParallelError(f"temperature must be > 0, got {temperature}")

    rank, world = _group_rank_world(group)
    partition = vocab_parallel_logits.shape[-1]
    start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(partition, rank, world)
    z = vocab_parallel_logits.to(_compute_dtype(vocab_parallel_logits.dtype))
    if temperature != 1.0:
        z = z / temperature
    if vocab_size is not None:
        # Columns past the real vocab (megatron pads it to a multiple of 128·tp) are not tokens the
        # rollout engine can sample: drop them. They are a suffix of every shard's range.
        if not 0 < vocab_size <= partition * world:
            raise VocabParallelError(
                f"vocab_size {vocab_size} must be in (0, {partition * world}] (padded vocab)")
        keep = max(0, min(partition, vocab_size - start))
        if keep < partition:
            z = z[..., :keep]
        end = start + keep
    if ((target < 0) | (target >= (vocab_size or partition * world))).any():
        raise VocabParallelError(
            f"target ids must be in [0, {vocab_size or partition * world}), got min "
            f"{int(target.min())} / max {int(target.max())}")
    return z, start, end


def vocab_parallel_logprobs_and_entropy(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), entropy), each shaped like ``target``, differentiable w.r.t. the logits.

    ``vocab_parallel_logits``: this rank's ``[..., V/tp]`` shard (megatron's ``[s, b, V/tp]``);
    ``target``: global token ids ``[...]``; ``group``: the TP group (default: megatron's, or a
    single full-vocab rank when megatron is not initialised); ``vocab_size``: the real vocab when
    the output layer is padded. Results are fp32 (fp64 for fp64 logits).
    """
    group = default_tp_group() if group is None else group
    z, start, end = _prepare(vocab_parallel_logits, target, temperature, vocab_size, group)
    return _LogProbEntropy.apply(z, target, group, start, end)


def vocab_parallel_logprobs(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log p(target) only, through megatron's ``vocab_parallel_cross_entropy`` (TP group from
    ``parallel_state``; without megatron initialised, a single full-vocab rank)."""
    if not parallel_state.model_parallel_is_initialized():
        return vocab_parallel_logprobs_and_entropy(
            vocab_parallel_logits, target, temperature=temperature, group=None)[0]
    z, _, _ = _prepare(vocab_parallel_logits, target, temperature, None,
                       parallel_state.get_tensor_model_parallel_group())
    if z is vocab_parallel_logits:
        # megatron's cross entropy subtracts the max from an fp32 input in place.
        z = z.clone()
    return -vocab_parallel_cross_entropy(z, target)


def vocab_parallel_logit_grad_sq(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    *,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """‖∂ log p(target) / ∂logits‖² per token (shaped like ``target``), no gradient.

    With p = softmax(z / T) over the real vocab, ∂ log p(y) / ∂z_v = (1[v = y] − p_v) / T, so the
    squared norm is ((1 − p_y)² + Σ_{v≠y} p_v²) / T². It is computed as
    ((Σ_{v≠y} e_v)² + Σ_{v≠y} e_v²) / (Σ_v e_v)² / T² with e = exp(z/T − max): no cancellation
    when p_y → 1 (1 − 2p_y + Σp² would lose every digit there). Communication: the max (MAX)
    and one fused SUM of three per-token scalars over the TP group, like the log-prob path.
    Padded vocab columns (past ``vocab_size``) are dropped, as everywhere in this module.
    """
    group = default_tp_group() if group is None else group
    with torch.no_grad():
        z, start, end = _prepare(vocab_parallel_logits, target, temperature, vocab_size, group)
        if z.shape[-1] > 0:
            logits_max = z.amax(dim=-1)
        else:  # a rank whose shard is all vocab padding
            logits_max = torch.full(z.shape[:-1], float("-inf"), dtype=z.dtype, device=z.device)
        if group is not None:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        exp = torch.exp(z - logits_max.unsqueeze(-1))
        off_rank = (target < start) | (target >= end)
        local_target = (target - start).masked_fill(off_rank, 0).unsqueeze(-1)
        if z.shape[-1] > 0:
            at_target = exp.gather(-1, local_target).squeeze(-1)
            e_target = at_target.masked_fill(off_rank, 0.0)
            # Zero the target's column so the sums below run over v ≠ y only (a token whose
            # target lives on another rank keeps its column 0, the placeholder index).
            exp.scatter_(-1, local_target, at_target.masked_fill(~off_rank, 0.0).unsqueeze(-1))
        else:
            e_target = torch.zeros_like(logits_max)
        others = exp.sum(dim=-1)
        others_sq = exp.square_().sum(dim=-1)  # in place: exp is a [tokens, V/tp] allocation
        del exp
        sums = torch.stack([others, others_sq, e_target])
        if group is not None:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        others, others_sq, e_y = sums.unbind(0)
        total = others + e_y
        return (others.square() + others_sq) / total.square() / (temperature * temperature)


def logprobs_and_entropy_from_full_logits(
    logits: torch.Tensor, target: torch.Tensor, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:

    """The same quantities from full-vocab logits ``[..., V]`` (single rank, plain autograd)."""
    if logits.shape[:-1] != target.shape:
        raise VocabParallelError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must share leading dims")
    if not temperature > 0:
        raise VocabParallelError(f"temperature must be > 0, got {temperature}")
    z = logits.to(_compute_dtype(logits.dtype)) / temperature
    log_p = torch.log_softmax(z, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    return log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1), entropy
