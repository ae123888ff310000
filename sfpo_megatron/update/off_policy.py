"""The trainer side of VCPO (arXiv 2602.17616): what one update does with stale rollouts.

Called by :class:`~sfpo_megatron.update.policy_update.PolicyUpdater` right after the old log-probs at θ(s,0):

* **importance weights**: log w_i = Σ_t (log π_θ(s,0) − log μ) per trajectory, from the old
  log-probs (θ(s,0), recomputed by the trainer) and the rollout engine's log-probs μ — the same
  w for every pass of the update (the K fast passes and the slow pass of SFPO all see the same
  stale batch), as verl computes its rollout-IS weights from ``old_log_prob``;
* **ESS** per optimizer step: over each mini-batch, all-reduced across DP (``vcpo.
  effective_sample_size``), ρ = ESS / B; with ``--vcpo`` the step's LR is multiplied by
  ``ess_lr_scale(ρ)`` (``trainer.main_params.scaled_lr``, restored right after ``optimizer.step()``);
* **truncated IS** in the loss: min(w_i, C) per sequence (``PolicyUpdater._train_loss``);
* **OPOB** (``--off-policy-baseline opob``): the group advantages are recomputed from the rewards
  with b* = Σ w²‖g‖²R / Σ w²‖g‖², ‖g‖² per trajectory (``--opob-grad-norm``): ``logit``, the
  norm of ∂ log π(τ)/∂logits, comes out of the old-log-prob forward itself (no extra pass);
  ``exact``, over all parameters, costs one backward per trajectory (``trainer.trajectory_grad_norms``)
  and normalises by the population group std without an epsilon, as the VCPO reference code
  (``logit`` keeps GRPO's unbiased std + ``--advantage-eps``).

Without ``--vcpo`` but with ``--async-rollout`` only the statistics are computed and logged (ESS,
ρ, w percentiles): the update itself is the plain one.

Log-weights live on the last pipeline stage (where the log-probs are); the per-mini-batch ESS and
the logged statistics are broadcast over the pipeline group so every rank steps with the same
LR and reports the same metrics.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from sfpo_megatron.algorithms.advantages import group_normalized_advantages
from sfpo_megatron.algorithms.vcpo import (
    LR_SCALING_MODES,
    VCPOError,
    effective_sample_size,
    ess_lr_scale,
    importance_weight_stats,
    opob_advantages,
)
from sfpo_megatron.distributed.platform import current_platform
from sfpo_megatron.trainer.policy_forward import broadcast_from_last_stage
from sfpo_megatron.trainer.train_batch import TrainBatch

GRAD_NORM_MODES = ("logit", "exact")
# ‖g‖² per row of this rank's rows (float64 CPU), or None off the last stage in logit mode
GradSqNorms = Callable[[TrainBatch], "torch.Tensor | None"]
_PERCENTILES = (50.0, 90.0, 99.0)


@dataclass(frozen=True)
class OffPolicyConfig:
    track: bool = False  # compute and log importance weights / ESS (async or VCPO)
    vcpo: bool = False  # apply the correction (TIS in the loss, ESS-scaled LR, OPOB)
    tis_threshold: float = 8.0
    lr_scaling: str = "sqrt"
    rho_base: float = 1.0
    opob: bool = False
    grad_norm: str = "logit"

    @staticmethod
    def from_args(args: argparse.Namespace) -> OffPolicyConfig:
        vcpo = bool(getattr(args, "vcpo", False))
        cfg = OffPolicyConfig(
            track=vcpo or bool(getattr(args, "async_rollout", False)), vcpo=vcpo,
            tis_threshold=float(getattr(args, "tis_threshold", 8.0)),
            lr_scaling=str(getattr(args, "ess_lr_scaling", "sqrt")),
            rho_base=float(getattr(args, "ess_rho_base", 1.0)),
            opob=getattr(args, "off_policy_baseline", "none") == "opob",
            grad_norm=str(getattr(args, "opob_grad_norm", "logit")))
        cfg.check()
        return cfg

    def check(self) -> None:
        if self.opob and not self.vcpo:
            raise VCPOError("--off-policy-baseline opob is part of VCPO: add --vcpo")
        if not self.tis_threshold > 0:
            raise VCPOError(f"--tis-threshold must be > 0, got {self.tis_threshold}")
        if not self.rho_base > 0:
            raise VCPOError(f"--ess-rho-base must be > 0, got {self.rho_base}")
        if self.lr_scaling not in LR_SCALING_MODES:
            raise VCPOError(f"--ess-lr-scaling must be one of {LR_SCALING_MODES}, got {self.lr_scaling!r}")
        if self.grad_norm not in GRAD_NORM_MODES:
            raise VCPOError(f"--opob-grad-norm must be one of {GRAD_NORM_MODES}, got {self.grad_norm!r}")


def _ess_per_mini_batch(local: Sequence[TrainBatch], last_stage: bool) -> torch.Tensor:
    """[J, 3]: ESS, B and ρ of each mini-batch (all DP ranks), known on every rank."""
    num = len(local)
    rows = None
    if last_stage:
        dp = ps.get_data_parallel_group()
        rows = torch.tensor([[r.ess, r.num_samples, r.rho] for r in
                             (effective_sample_size(mb.log_weights, group=dp) for mb in local)],
                            dtype=torch.float64).reshape(-1)
    return broadcast_from_last_stage(rows, 3 * num).reshape(num, 3)


def _weight_stats(local: Sequence[TrainBatch], last_stage: bool, threshold: float) -> dict[str, float]:
    keys = ["is_weight/max", "is_weight/min", "is_weight/mean", "is_weight/log_max",
            *(f"is_weight/p{p:g}" for p in _PERCENTILES), "is_weight/log_mean",
            "is_weight/truncated_frac"]
    values = None
    if last_stage:
        lw = torch.cat([mb.log_weights for mb in local]).to(torch.float64)
        dp = ps.get_data_parallel_group()
        stats = importance_weight_stats(lw, group=dp, percentiles=_PERCENTILES)
        sums = torch.tensor([float(lw.sum()), float((lw > math.log(threshold)).sum()), lw.numel()],
                            dtype=torch.float64, device=current_platform().device())
        dist.all_reduce(sums, group=dp)
        stats["is_weight/log_mean"] = float(sums[0] / sums[2])
        stats["is_weight/truncated_frac"] = float(sums[1] / sums[2])
        values = torch.tensor([stats[k] for k in keys], dtype=torch.float64)
    return dict(zip(keys, broadcast_from_last_stage(values, len(keys)).tolist()))


def _opob(minis: Sequence[TrainBatch], last_stage: bool, grad_sq: GradSqNorms,
          advantage_eps: float, std_normalize: bool, grad_norm: str) -> dict[str, float]:
    """Replace the advantages of this rank's rows by the OPOB ones (whole groups, all DP ranks)."""
    t0 = time.perf_counter()
    local = TrainBatch.concat(list(minis))
    g2 = grad_sq(local)
    t_norm = time.perf_counter() - t0
    gap = torch.zeros(1, dtype=torch.float64)
    if last_stage:
        if local.rewards is None:
            raise VCPOError("--off-policy-baseline opob needs the rewards in the training batch")
        # Rows of all DP ranks (groups may straddle shards and mini-batches): order does not
        # matter, OPOB works per group id; this rank's rows are its segment of the gather.
        cols = torch.stack([local.rewards.double(), local.log_weights.double(), g2.double().cpu(),
                            local.group_ids.double()]).to(current_platform().device())
        dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        parts = [torch.empty_like(cols) for _ in range(dp)]
        dist.all_gather(parts, cols, group=ps.get_data_parallel_group())
        r, lw, norms, gid = torch.cat(parts, dim=1).cpu()
        # b* is invariant to scaling w within a group: shift log w by the group max so exp()
        # neither overflows nor underflows to an all-zero group.
        gmax = torch.full_like(lw, -math.inf)
        for g in gid.unique():
            sel = gid == g
            gmax[sel] = lw[sel].max()
        w = torch.exp(lw - gmax)
        # exact: the VCPO reference's population group std, no epsilon (algorithms/vcpo.py)
        std = "population" if grad_norm == "exact" else "unbiased"
        adv = opob_advantages(r, w, norms, gid.long(), eps=advantage_eps, std_normalize=std_normalize,
                              std=std)
        n = local.size
        mine = adv[rank * n:(rank + 1) * n].to(torch.float32)
        offset = 0
        for mb in minis:
            mb.advantages = mine[offset:offset + mb.size].clone()
            offset += mb.size
        group_mean = group_normalized_advantages(r.tolist(), gid.long().tolist(), eps=advantage_eps,
                                                 std_normalize=std_normalize).to(torch.float32)
        gap = (adv.to(torch.float32) - group_mean).abs().mean()
        gap = gap.reshape(1).double()
    gap = broadcast_from_last_stage(gap, 1)
    return {"vcpo/opob_advantage_shift": float(gap[0]), "time/opob_grad_norm_s": t_norm}


def off_policy_correction(cfg: OffPolicyConfig, minis: Sequence[TrainBatch], *, grad_sq: GradSqNorms,
                          advantage_eps: float, std_normalize: bool
                          ) -> tuple[dict[str, float], list[float] | None]:
    """ESS per mini-batch (this rank's rows of each, ``log_weights`` set), IS-weight statistics
    and, with OPOB, the mini-batches' advantages replaced in place. Returns the metrics (equal on
    every rank) and, with --vcpo, the LR scale of each mini-batch's optimizer step.

    ``grad_sq(local)``: ‖g‖² of this rank's rows (all mini-batches concatenated), used by OPOB
    only; collective in "exact" mode, so every rank calls it."""
    last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
    ess = _ess_per_mini_batch(minis, last_stage)
    rho = ess[:, 2].tolist()
    scales = [ess_lr_scale(min(x, 1.0), cfg.rho_base, cfg.lr_scaling if cfg.vcpo else "none")
              for x in rho]
    metrics = {"vcpo/ess": float(ess[:, 0].mean()), "vcpo/rho": sum(rho) / len(rho),
               "vcpo/rho_min": min(rho), "vcpo/lr_scale": sum(scales) / len(scales),
               "vcpo/lr_scale_min": min(scales)}
    metrics.update(_weight_stats(minis, last_stage, cfg.tis_threshold))
    if cfg.opob:
        metrics.update(_opob(minis, last_stage, grad_sq, advantage_eps, std_normalize, cfg.grad_norm))
    return metrics, scales if cfg.vcpo else None
