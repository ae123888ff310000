"""VCPO (arXiv 2602.17616) pure functions: sequence importance weights, truncated IS, ESS-scaled
learning rate, the off-policy optimal baseline (OPOB) and weight statistics for logging.

For trajectory i with response tokens t (π_θ the trainer's policy, μ the rollout engine's):

    log w_i = Σ_t (log π_θ(y_t) − log μ(y_t))          (full product, never clipped for ESS)
    truncated IS weight in the loss: min(w_i, C)        (C = --tis-threshold, default 8)
    ESS = (Σ w)² / Σ w²,  ρ = ESS / B                   (over the optimizer step's mini-batch,
                                                         across all DP ranks)
    lr = lr_base · min(1, ρ/ρ_base)^p                   p = 1/2 (sqrt), 1 (linear), 0 (none)
    b*_g = Σ_{i∈g} w_i² ‖∇log π(τ_i)‖² R_i / Σ_{i∈g} w_i² ‖∇log π(τ_i)‖²
    A_i = (R_i − b*_g) / (σ_g + eps)                    σ_g: unbiased group std of R (as GRPO)
    A_i = (R_i − b*_g) / σ_g, or R_i − b*_g if σ_g = 0  σ_g: population std (std="population",
                                                        the VCPO reference code's, see below)

OPOB's choices against the VCPO reference code (docs/ARCHITECTURE.md, "OPOB and its reference"):
the weight is w_i² with the untruncated w_i (not w_i²·min(w_i, C)²) in both std modes;
``std="population"`` (what ``--opob-grad-norm exact`` uses) takes the reference's population
group std without an epsilon; ``std="unbiased"`` (``logit``) keeps GRPO's unbiased std + eps.

Everything works on log-weights: w = exp(Σ log-ratio) overflows float32 after a few hundred
tokens of drift, while ESS and the truncated weights are exact in log space.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sfpo_megatron.algorithms.advantages import _group_index, group_std
from sfpo_megatron.errors import UserError

LR_SCALING_MODES = ("sqrt", "linear", "none")
STD_MODES = ("unbiased", "population")


class VCPOError(UserError):
    """An invalid VCPO setting or input."""


def sequence_log_ratio(
    log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """``[B, T]`` per-token log-probs of the trainer and of the rollout engine → ``[B]`` log w_i."""
    if not (log_probs.shape == rollout_log_probs.shape == response_mask.shape) or log_probs.dim() != 2:
        raise VCPOError(
            f"log_probs {tuple(log_probs.shape)}, rollout_log_probs {tuple(rollout_log_probs.shape)} "
            f"and response_mask {tuple(response_mask.shape)} must all be the same [B, T]")
    mask = response_mask.to(torch.bool)
    diff = log_probs.detach().to(torch.float64) - rollout_log_probs.detach().to(torch.float64)
    return torch.where(mask, diff, torch.zeros((), dtype=diff.dtype)).sum(dim=-1)


def truncated_is_weights(log_weights: torch.Tensor, threshold: float = 8.0) -> torch.Tensor:
    """min(w_i, C), computed as exp(min(log w_i, log C)) so it never overflows; no gradient."""
    if not threshold > 0:
        raise VCPOError(f"tis threshold must be > 0, got {threshold}")
    return torch.exp(torch.clamp(log_weights.detach(), max=math.log(threshold)))


@dataclass(frozen=True)
class ESSResult:
    ess: float  # (Σw)² / Σw² over the whole mini-batch (all DP ranks)
    num_samples: int  # B, the mini-batch's trajectories across DP ranks
    rho: float  # ESS / B in (0, 1]


def effective_sample_size(
    log_weights: torch.Tensor, group: dist.ProcessGroup | None = None
) -> ESSResult:
    """ESS of this rank's ``[B_local]`` log-weights, all-reduced over ``group`` (the DP group).

    Equivalent to all-gathering the weights and computing (Σw)²/Σw²: each rank sends
    max log w (MAX), then Σ exp(log w − max), Σ exp(2(log w − max)) and its count (SUM).
    """
    lw = log_weights.detach().to(torch.float64).reshape(-1)
    if not torch.isfinite(lw).all() and lw.numel():
        raise VCPOError(f"log-weights must be finite, got max {lw.max().item()} / min {lw.min().item()}")
    local_max = lw.max() if lw.numel() else torch.tensor(-math.inf, dtype=lw.dtype, device=lw.device)
    gmax = local_max.clone().reshape(1)
    if group is not None:
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
    if not math.isfinite(gmax.item()):
        raise VCPOError("effective_sample_size over an empty mini-batch")
    shifted = lw - gmax
    sums = torch.stack([torch.exp(shifted).sum(), torch.exp(2.0 * shifted).sum(),
                        torch.tensor(float(lw.numel()), dtype=lw.dtype, device=lw.device)])
    if group is not None:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    s1, s2, n = (float(x) for x in sums)
    ess = s1 * s1 / s2
    return ESSResult(ess=ess, num_samples=int(n), rho=ess / n)


def ess_lr_scale(rho: float, rho_base: float = 1.0, mode: str = "sqrt") -> float:
    """LR multiplier for one optimizer step: min(1, ρ/ρ_base)^(1/2 | 1), or 1 for ``none``."""
    if mode not in LR_SCALING_MODES:
        raise VCPOError(f"--ess-lr-scaling must be one of {LR_SCALING_MODES}, got {mode!r}")
    if not rho_base > 0:
        raise VCPOError(f"--ess-rho-base must be > 0, got {rho_base}")
    if not 0 < rho <= 1 + 1e-12:
        raise VCPOError(f"rho = ESS/B must be in (0, 1], got {rho}")
    if mode == "none":
        return 1.0
    ratio = min(1.0, rho / rho_base)
    return math.sqrt(ratio) if mode == "sqrt" else ratio


def _check_group_inputs(rewards: torch.Tensor, *others: torch.Tensor) -> None:
    for o in others:
        if o.shape != rewards.shape or rewards.dim() != 1:
            raise VCPOError(
                f"rewards, weights and grad_sq_norms must all be [B], got "
                f"{[tuple(rewards.shape)] + [tuple(x.shape) for x in others]}")


def opob_baseline(
    rewards: torch.Tensor,
    weights: torch.Tensor,
    grad_sq_norms: torch.Tensor,
    group_ids: torch.Tensor | Sequence[Hashable],
) -> torch.Tensor:
    """Per-sample b* of its prompt group (``[B]``): Σ w²‖g‖²R / Σ w²‖g‖² over the group.

    ``weights`` are the sequence importance weights w_i (untruncated), ``grad_sq_norms`` the
    squared norms ‖∇_θ log π(τ_i)‖². A group whose Σ w²‖g‖² is 0 falls back to its plain
    mean.
    """
    r = torch.as_tensor(rewards, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64)
    g2 = torch.as_tensor(grad_sq_norms, dtype=torch.float64)
    _check_group_inputs(r, w, g2)
    if (w < 0).any() or (g2 < 0).any() or not torch.isfinite(w * w * g2).all():
        raise VCPOError("weights and grad_sq_norms must be finite and >= 0")
    index, num_groups = _group_index(group_ids, r.numel())
    out = torch.empty_like(r)
    for gi in range(num_groups):
        sel = index == gi
        c = w[sel].square() * g2[sel]
        denom = c.sum()
        out[sel] = (c * r[sel]).sum() / denom if denom > 0 else r[sel].mean()
    return out


def opob_advantages(
    rewards: torch.Tensor,
    weights: torch.Tensor,
    grad_sq_norms: torch.Tensor,
    group_ids: torch.Tensor | Sequence[Hashable],
    *,
    eps: float = 1e-6,
    std_normalize: bool = True,
    std: str = "unbiased",
) -> torch.Tensor:
    """(R_i − b*) / (σ_group + eps) per sample (``[B]``, float64); σ_group as in GRPO.

    ``std="population"``: (R_i − b*) / σ_group with the population std and no epsilon, R_i − b*
    where σ_group is 0 (the VCPO reference code's normalisation; ``eps`` unused).
    A group whose rewards are all equal gets exactly 0, like the GRPO advantages.
    """
    if std not in STD_MODES:
        raise VCPOError(f"std must be one of {STD_MODES}, got {std!r}")
    r = torch.as_tensor(rewards, dtype=torch.float64)
    baseline = opob_baseline(r, weights, grad_sq_norms, group_ids)
    index, num_groups = _group_index(group_ids, r.numel())
    adv = r - baseline
    if std_normalize and std == "population":
        sigma = torch.zeros_like(r)
        for gi in range(num_groups):
            sel = index == gi
            sigma[sel] = torch.std(r[sel], correction=0)
        adv = torch.where(sigma > 0, adv / torch.where(sigma > 0, sigma, 1.0), adv)
    elif std_normalize:
        adv = adv / (group_std(r, index, num_groups) + eps)
    for gi in range(num_groups):
        sel = index == gi
        if bool((r[sel] == r[sel][0]).all()):
            adv[sel] = 0.0
    return adv


def _all_gather_varlen(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    world = dist.get_world_size(group)
    # Tensors stay on x's device: NCCL groups only move CUDA tensors.
    n = torch.tensor([x.numel()], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=x.dtype, device=x.device)
    padded[: x.numel()] = x
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def importance_weight_stats(
    log_weights: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    percentiles: Sequence[float] = (50.0, 90.0, 99.0),
) -> dict[str, float]:

    """max / min / mean / percentiles of w over the mini-batch (all DP ranks), for logging."""
    lw = log_weights.detach().to(torch.float64).reshape(-1)
    if group is not None:
        lw = _all_gather_varlen(lw, group)
    lw = lw.cpu()
    if lw.numel() == 0:
        raise VCPOError("importance_weight_stats over an empty mini-batch")
    w = torch.exp(lw)
    stats = {"is_weight/max": float(w.max()), "is_weight/min": float(w.min()),
             "is_weight/mean": float(w.mean()), "is_weight/log_max": float(lw.max())}
    for p in percentiles:
        stats[f"is_weight/p{p:g}"] = float(torch.quantile(w, p / 100.0))
    return stats
