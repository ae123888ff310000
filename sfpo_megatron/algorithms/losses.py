"""GRPO-family policy loss: PPO clipped surrogate, dual clip, entropy bonus, KL, loss aggregation.

Semantics follow verl (volcengine/verl ``verl/trainer/ppo/core_algos.py``):
``compute_policy_loss_vanilla`` (clip with separate low/high ranges, log-ratio clamped to ±20,
``ppo_kl`` and clip-fraction metrics, dual clip for negative advantages), ``kl_penalty``
(``k3`` == ``low_var_kl``, clamped like verl) and ``agg_loss`` in its *global-batch* form
(``batch_num_tokens`` / ``global_batch_size`` / ``loss_scale_factor``).

Micro-batching and data parallelism
-----------------------------------
Every aggregation mode is a sum over tokens divided by a constant of the whole mini-batch:

    token-mean              Σ_{i,t} m·l / N              N = valid tokens in the mini-batch
    seq-mean-token-mean     Σ_i [Σ_t m·l / n_i] / S      n_i = valid tokens of sequence i,
                                                         S = sequences with n_i > 0
    seq-mean-token-sum-norm Σ_{i,t} m·l / (S · L)        L = loss_scale_factor (a constant,
                                                         default max response length)

so the loss is linear in the per-sequence terms once N, S (and L) are fixed. :func:`agg_loss` and
:func:`policy_loss` take those constants as a :class:`LossDenominators` computed over the *whole*
mini-batch (:func:`mini_batch_denominators`, optionally all-reduced over the DP group). Each call
on a micro-batch then returns that micro-batch's *contribution*, and

    Σ over micro-batches and DP ranks of the contributions == the loss of the whole mini-batch,

hence the summed gradients equal the mini-batch gradient exactly (up to float summation order).
Megatron's pipeline schedule divides each micro-batch loss by ``num_microbatches`` and its DDP
averages gradients over DP, so a megatron ``loss_func`` must return
``contribution * num_microbatches * dp_size`` to get this sum. (verl's
``seq-mean-token-sum-norm`` before its global-batch rewrite divided by L only, without S; we
follow the current, micro-batch-invariant definition.)

Masked (padding) tokens contribute nothing: every input is replaced by 0 outside the mask before
any arithmetic, so even inf / NaN garbage on padding gives the same loss and exactly zero gradient
there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sfpo_megatron.errors import UserError

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")
# verl clamps the log-ratio before exp() "for numerical stability".
_LOG_RATIO_CLAMP = 20.0


class LossConfigError(UserError):
    """An invalid loss setting or input shape."""


@dataclass(frozen=True)
class LossDenominators:
    """Constants of the whole mini-batch that make aggregation micro-batch invariant."""

    num_tokens: float  # N: valid tokens in the whole mini-batch (all micro-batches, DP ranks)
    num_seqs: float  # S: sequences with at least one valid token in the whole mini-batch
    loss_scale_factor: float  # L: the seq-mean-token-sum-norm constant

    def __post_init__(self) -> None:
        if self.loss_scale_factor <= 0:
            raise LossConfigError(f"loss_scale_factor must be > 0, got {self.loss_scale_factor}")
        if self.num_tokens < 0 or self.num_seqs < 0:
            raise LossConfigError(
                f"denominators must be >= 0, got num_tokens={self.num_tokens}, "
                f"num_seqs={self.num_seqs}")


@dataclass(frozen=True)
class PolicyLossConfig:
    """Settings of :func:`policy_loss` (flags ``--eps-clip``, ``--eps-clip-high``, ...)."""

    eps_clip: float | None = 0.2  # None: no PPO clip (plain ratio · A, as VCPO uses)
    eps_clip_high: float | None = None  # None: same as eps_clip (DAPO clip-higher if larger)
    clip_ratio_c: float | None = None  # dual clip bound (> 1) for A < 0; None: off
    loss_agg_mode: str = "token-mean"
    entropy_coeff: float = 0.0
    kl_coeff: float = 0.0  # > 0 needs ref_log_probs
    kl_type: str = "low_var_kl"

    def __post_init__(self) -> None:
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise LossConfigError(
                f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {self.loss_agg_mode!r}")
        if self.kl_type not in KL_TYPES:
            raise LossConfigError(f"kl_type must be one of {KL_TYPES}, got {self.kl_type!r}")
        if self.eps_clip is not None and not 0 <= self.eps_clip < 1:
            raise LossConfigError(f"eps_clip must be in [0, 1), got {self.eps_clip}")
        if self.eps_clip_high is not None:
            if self.eps_clip is None:
                raise LossConfigError(
                    f"eps_clip_high={self.eps_clip_high} needs eps_clip (clipping is off)")
            if self.eps_clip_high < 0:
                raise LossConfigError(f"eps_clip_high must be >= 0, got {self.eps_clip_high}")
        if self.clip_ratio_c is not None:
            if self.eps_clip is None:
                raise LossConfigError(
                    f"clip_ratio_c={self.clip_ratio_c} needs eps_clip (clipping is off)")
            if self.clip_ratio_c <= 1.0:
                raise LossConfigError(
                    f"clip_ratio_c (dual clip) must be > 1.0, got {self.clip_ratio_c}")
        if self.kl_coeff < 0:
            raise LossConfigError(f"kl_coeff must be >= 0, got {self.kl_coeff}")


def _check_mask(x: torch.Tensor, mask: torch.Tensor, name: str) -> None:
    if x.shape != mask.shape:
        raise LossConfigError(
            f"{name} has shape {tuple(x.shape)} but response_mask has {tuple(mask.shape)}")


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where(), not x * mask: 0 * inf / NaN on padding would poison the sum and its gradient.
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def mini_batch_denominators(
    response_mask: torch.Tensor | Sequence[torch.Tensor],
    loss_scale_factor: float | None = None,
    group: dist.ProcessGroup | None = None,
) -> LossDenominators:
    """N and S of a mini-batch from its response mask(s) ``[B, T]``.

    Pass this rank's whole share of the mini-batch (one mask, or the list of its micro-batches'
    masks, which may be padded to different T) and the DP ``group``: N and S are then
    all-reduced (SUM) so every rank uses the global constants. ``loss_scale_factor`` defaults to
    T (verl's default: the padded max response length); micro-batches padded to different lengths
    need it passed explicitly (the configured max response length), or the constant would differ.
    """
    masks = [response_mask] if isinstance(response_mask, torch.Tensor) else list(response_mask)
    if not masks:
        raise LossConfigError("mini_batch_denominators needs at least one response mask")
    for m in masks:
        if m.dim() != 2:
            raise LossConfigError(f"response_mask must be [B, T], got {tuple(m.shape)}")
    lengths = sorted({m.shape[-1] for m in masks})
    if loss_scale_factor is None and len(lengths) > 1:
        raise LossConfigError(
            f"micro-batch masks have different lengths {lengths}: pass loss_scale_factor "
            "(the max response length) explicitly")
    counts = torch.stack([torch.stack([m.to(torch.bool).sum(), m.to(torch.bool).any(dim=-1).sum()])
                          for m in masks]).sum(dim=0).to(torch.float64)
    if group is not None:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    scale = float(lengths[0] if loss_scale_factor is None else loss_scale_factor)
    return LossDenominators(float(counts[0]), float(counts[1]), scale)


def agg_loss(
    loss_mat: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str,
    denominators: LossDenominators | None = None,
) -> torch.Tensor:
    """Aggregates a per-token ``[B, T]`` loss; returns this micro-batch's contribution.

    Without ``denominators`` the batch given is taken as the whole mini-batch (verl's local
    ``agg_loss``). A mini-batch with no valid token gives 0 (with a zero gradient).
    """
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise LossConfigError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    mask = response_mask.to(torch.bool)
    _check_mask(loss_mat, mask, "loss_mat")
    if denominators is None:
        denominators = mini_batch_denominators(mask)
    masked = _masked(loss_mat, mask)
    if loss_agg_mode == "token-mean":
        denom = denominators.num_tokens
        total = masked.sum()
    elif loss_agg_mode == "seq-mean-token-mean":
        denom = denominators.num_seqs
        seq_tokens = mask.sum(dim=-1).clamp(min=1).to(masked.dtype)
        total = (masked.sum(dim=-1) / seq_tokens).sum()
    else:  # seq-mean-token-sum-norm
        denom = denominators.num_seqs * denominators.loss_scale_factor
        total = masked.sum()
    if denom == 0:
        return total * 0.0
    return total / denom


def kl_penalty(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference (verl's ``kl_penalty``).

    ``k3`` / ``low_var_kl``: exp(ref - logp) - (ref - logp) - 1 with the log-ratio clamped to
    ±20 and the result clamped to [-10, 10], as verl.
    """
    diff = log_probs - ref_log_probs
    if kl_type in ("k1", "kl"):
        return diff
    if kl_type == "abs":
        return diff.abs()
    if kl_type in ("k2", "mse"):
        return 0.5 * diff.square()
    if kl_type in ("k3", "low_var_kl"):
        kl = torch.clamp(ref_log_probs - log_probs, min=-20.0, max=20.0)
        return torch.clamp(torch.exp(kl) - kl - 1.0, min=-10.0, max=10.0)
    raise LossConfigError(f"kl_type must be one of {KL_TYPES}, got {kl_type!r}")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return _masked(x, mask).sum() / count.clamp(min=1)


def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: PolicyLossConfig,
    *,
    entropy: torch.Tensor | None = None,
    ref_log_probs: torch.Tensor | None = None,
    seq_weights: torch.Tensor | None = None,
    denominators: LossDenominators | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:

    """GRPO/PPO policy loss contribution of one micro-batch, plus detached metrics.

    Shapes: ``log_probs`` (with grad), ``old_log_probs``, ``response_mask`` ``[B, T]``;
    ``advantages`` ``[B, T]`` or ``[B]`` (one per response); ``entropy`` ``[B, T]`` (with grad
    when ``entropy_coeff`` > 0); ``ref_log_probs`` ``[B, T]``; ``seq_weights`` ``[B]``: per-sequence
    weights applied to the policy-gradient term (VCPO truncated IS, see
    :func:`sfpo_megatron.algorithms.vcpo.truncated_is_weights`; treated as constants).

    loss = agg(pg) - entropy_coeff · agg(entropy) + kl_coeff · agg(kl), all aggregated with the
    same mode and ``denominators`` (see module doc). Metrics are masked means over this
    micro-batch (``pg_clipfrac``, ``pg_clipfrac_lower``, ``ppo_kl``, ``entropy``, ``kl``) and
    ``num_tokens`` so the caller can token-weight them across micro-batches.
    """
    mask = response_mask.to(torch.bool)
    if mask.dim() != 2:
        raise LossConfigError(f"response_mask must be [B, T], got {tuple(mask.shape)}")
    _check_mask(log_probs, mask, "log_probs")
    _check_mask(old_log_probs, mask, "old_log_probs")
    if advantages.dim() == 1:
        if advantages.shape[0] != mask.shape[0]:
            raise LossConfigError(
                f"advantages has {advantages.shape[0]} entries but the batch has {mask.shape[0]}")
        advantages = advantages.unsqueeze(-1).expand_as(log_probs)
    _check_mask(advantages, mask, "advantages")
    if denominators is None:
        denominators = mini_batch_denominators(mask)

    log_probs = _masked(log_probs, mask)
    old_log_probs = _masked(old_log_probs.detach(), mask)
    adv = _masked(advantages.detach().to(log_probs.dtype), mask)

    neg_approx_kl = torch.clamp(log_probs - old_log_probs, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = torch.exp(neg_approx_kl)
    pg_losses1 = -adv * ratio
    if config.eps_clip is None:
        pg_losses = pg_losses1
        clipped = torch.zeros_like(mask)
        clipped_lower = torch.zeros_like(mask)
    else:
        low = config.eps_clip
        high = config.eps_clip if config.eps_clip_high is None else config.eps_clip_high
        pg_losses2 = -adv * torch.clamp(ratio, 1.0 - low, 1.0 + high)
        clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
        clipped = pg_losses2 > pg_losses1
        if config.clip_ratio_c is None:
            pg_losses = clip_pg_losses1
            clipped_lower = torch.zeros_like(mask)
        else:
            # Dual clip (verl): for A < 0 the loss is also capped at -A · c.
            pg_losses3 = -adv * config.clip_ratio_c
            clip_pg_losses2 = torch.minimum(pg_losses3, clip_pg_losses1)
            clipped_lower = (clip_pg_losses1 > pg_losses3) & (adv < 0)
            pg_losses = torch.where(adv < 0, clip_pg_losses2, clip_pg_losses1)
    if seq_weights is not None:
        if seq_weights.shape != (mask.shape[0],):
            raise LossConfigError(
                f"seq_weights must be [B={mask.shape[0]}], got {tuple(seq_weights.shape)}")
        pg_losses = pg_losses * seq_weights.detach().to(pg_losses.dtype).unsqueeze(-1)

    mode = config.loss_agg_mode
    loss = agg_loss(pg_losses, mask, mode, denominators)
    count = mask.sum()
    metrics: dict[str, torch.Tensor] = {
        "pg_loss": loss.detach(),
        "pg_clipfrac": _masked_mean(clipped.to(log_probs.dtype), mask, count),
        "pg_clipfrac_lower": _masked_mean(clipped_lower.to(log_probs.dtype), mask, count),
        "ppo_kl": _masked_mean(-neg_approx_kl.detach(), mask, count),
        "num_tokens": count.to(log_probs.dtype),
    }
    if entropy is not None:
        _check_mask(entropy, mask, "entropy")
        ent = _masked(entropy, mask)
        metrics["entropy"] = _masked_mean(ent.detach(), mask, count)
        if config.entropy_coeff != 0.0:
            loss = loss - config.entropy_coeff * agg_loss(ent, mask, mode, denominators)
    elif config.entropy_coeff != 0.0:
        raise LossConfigError(
            f"entropy_coeff={config.entropy_coeff} needs the per-token entropy tensor")
    if config.kl_coeff > 0.0:
        if ref_log_probs is None:
            raise LossConfigError(f"kl_coeff={config.kl_coeff} needs ref_log_probs")
        _check_mask(ref_log_probs, mask, "ref_log_probs")
        kld = _masked(kl_penalty(log_probs, _masked(ref_log_probs.detach(), mask), config.kl_type),
                      mask)
        kl_loss = agg_loss(kld, mask, mode, denominators)
        metrics["kl"] = _masked_mean(kld.detach(), mask, count)
        loss = loss + config.kl_coeff * kl_loss
    return loss, {k: v.detach() for k, v in metrics.items()}
