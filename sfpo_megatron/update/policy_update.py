"""The SFPO / GRPO policy update on megatron (SFPO = arXiv 2510.04072, Algorithm 1).

For rollout batch s, starting from θ(s,0):

1. old log-probs at θ(s,0), once, forward-only (the PPO reference of every pass);
2. Stage I: K passes, each pass = the batch split into ``--num-steps-per-rollout`` mini-batches with
   one megatron optimizer step each (gradient clipping as configured);
3. Stage II: θ̃ = θ(s,0) + α(θ(s,K) − θ(s,0)) on the **fp32 main parameters** the optimizer
   updates — with the distributed optimizer each DP rank's shard of them — then main → model
   params and megatron's usual DP all-gather of the parameter buffers;
4. Stage III: one more pass from θ̃ (none with ``--sfpo-no-slow-pass``, the paper's "w/o Stage
   III" ablation: the step ends at θ̃ and the trigger watches the last fast pass's entropy);
5. LR scheduler stepped once; the controller observes the step's mean token entropy.

α comes from :class:`~sfpo_megatron.algorithms.sfpo_controller.SFPOController`; α = 0 (always with
``--algorithm grpo``, and for good once the entropy trigger fired) skips Stages I and II, so the
step is exactly one GRPO pass. Adam's moments and step count are never touched by Stage II.

``--ppo-epochs E`` (GRPO only, verl's ``ppo_epochs``): the GRPO step is E passes instead of one,
all against the same old log-probs at θ(s,0) — SFPO's K + 1 passes without the reposition, so
``--algorithm grpo --ppo-epochs K+1`` equals SFPO with α = 1 and the trigger off. ``--algorithm
sfpo`` refuses E > 1 (its passes are K fast + 1 slow, and 1 once the trigger fired). Passes are
logged as ``fast0`` … ``fast{K-1}``, ``slow`` (SFPO, and GRPO with E = 1) or ``epoch0`` …
``epoch{E-1}`` (GRPO with E > 1). ``--no-ppo-clip`` with more than one optimizer step per
rollout batch is refused unless ``--allow-unclipped-multi-step`` (:func:`check_update_args`).

Stage II works on the optimizer's fp32 main parameters (``trainer/main_params.py``): one extra
copy of this rank's shard (host memory with ``--sfpo-snapshot-offload``), no communication beyond
megatron's ordinary DP all-gather of the parameter buffers.

The controller's entropy comes from the update's last pass (Stage III, or the GRPO step's last
pass) — the reference code appends the actor's training ``entropy_loss`` metric of the slow
``update_policy`` call. ``--sfpo-entropy-source`` picks the series (both are logged every step):

* ``global`` (default, ``sfpo/entropy_global``): the token mean over the whole batch (all
  micro-batches and DP ranks), which does not depend on the split;
* ``reference`` (``sfpo/entropy_reference``): the reference's own number — verl takes each
  micro-batch's token mean, its ``reduce_metrics`` averages them over the pass, and the driver
  keeps DP rank 0's value (``DataProto.concat`` takes the first worker's metrics): the mean over
  all micro-batches of the pass on DP rank 0 of their token means. Micro-batches without a
  response token (a NaN in verl) are left out. Which rows DP rank 0 holds follows this
  project's layout (each mini-batch split over DP), not verl's.

Use from the RL loop (every trainer rank, same calls)::

    setup = build_training_setup(args, arch, total_scheduler_steps=args.num_rollouts)
    ref = build_reference_model(args, arch, load_dir) if args.kl_coef > 0 else None
    updater = PolicyUpdater(args, setup, ref_model=ref)
    updater.load_state_dict(extra_state["policy_updater"])      # when resuming
    metrics = updater.update(samples, step)   # the whole batch (advantages set) on every rank
    save_checkpoint(..., extra_state={"policy_updater": updater.state_dict(), ...})

After ``update`` returns, the model parameters are θ(s+1,0) on every rank (also with
``--overlap-param-gather``), ready for the weight refit.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from sfpo_megatron.algorithms.losses import (
    LossDenominators,
    PolicyLossConfig,
    mini_batch_denominators,
    policy_loss,
)
from sfpo_megatron.algorithms.sfpo_controller import SFPOController
from sfpo_megatron.algorithms.vcpo import sequence_log_ratio, truncated_is_weights
from sfpo_megatron.distributed.platform import current_platform
from sfpo_megatron.errors import UserError
from sfpo_megatron.records import Sample
from sfpo_megatron.trainer.main_params import (
    MainParamSnapshot,
    check_supported,
    copy_main_to_model_params,
    finish_param_gather,
    scaled_lr,
)
from sfpo_megatron.trainer.model_setup import zero_grads
from sfpo_megatron.trainer.moe_metrics import RouterStats
from sfpo_megatron.trainer.packing import (
    PackSpec,
    balance_over_dp,
    check_budget,
    pack_rows,
    pack_shards,
    pack_spec,
    row_lengths,
)
from sfpo_megatron.trainer.policy_forward import compute_logprobs, run_micro_batches
from sfpo_megatron.trainer.train_batch import (
    TrainBatch,
    check_update_layout,
    collate,
    local_mini_batches,
)
from sfpo_megatron.trainer.trajectory_grad_norms import trajectory_grad_sq_norms
from sfpo_megatron.update.off_policy import OffPolicyConfig, off_policy_correction

_STATE_VERSION = 1
ALGORITHMS = ("sfpo", "grpo")


class PolicyUpdateError(UserError):
    """A setting or training setup the SFPO / GRPO update cannot run with."""


# ---------------------------------------------------------------------------------------------
# Main parameters of megatron's optimizers
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Reduction of per-micro-batch statistics
# ---------------------------------------------------------------------------------------------

# Columns of the per-micro-batch statistics row (sums; "· n" = token-weighted). The last two are
# nonzero on DP rank 0 only: the sum of its micro-batches' mean entropies, and their count (the
# reference's entropy series, summed over DP like the others).
_PG_LOSS, _CLIP, _CLIP_LOW, _PPO_KL, _ENTROPY, _KL, _TOKENS, _LOSS, _MB_ENTROPY, _MB_COUNT = range(10)
_NUM_STATS = 10
ENTROPY_SOURCES = ("global", "reference")


def _reduce_sums(rows: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """Sum of the last stage's rows over micro-batches and DP ranks, known on every rank."""
    total = torch.zeros(width, dtype=torch.float64, device=current_platform().device())
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for r in rows:
            total += r.to(total.device, torch.float64)
        dist.all_reduce(total, group=ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(total, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return total.cpu()


def _reduce_max(values: Sequence[torch.Tensor]) -> float:
    """Max of the last stage's values over DP ranks (0 when none), known on every rank."""
    total = torch.zeros(1, dtype=torch.float64, device=current_platform().device())
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for v in values:
            total = torch.maximum(total, v.to(total.device, torch.float64).reshape(1))
        dist.all_reduce(total, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(total, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return float(total.cpu())


def _pass_metrics(total: torch.Tensor) -> dict[str, float]:
    n = max(float(total[_TOKENS]), 1.0)
    return {"pg_loss": float(total[_PG_LOSS]), "loss": float(total[_LOSS]),
            "pg_clipfrac": float(total[_CLIP]) / n,
            "pg_clipfrac_lower": float(total[_CLIP_LOW]) / n,
            "ppo_kl": float(total[_PPO_KL]) / n, "entropy": float(total[_ENTROPY]) / n,
            "kl": float(total[_KL]) / n, "num_tokens": float(total[_TOKENS]),
            "dp0_micro_batch_entropy_sum": float(total[_MB_ENTROPY]),
            "dp0_micro_batches": float(total[_MB_COUNT])}


def _token_metrics(real: float, forwarded: float, micro_batches: int) -> dict[str, float]:
    """One training pass over the rollout batch, all DP ranks: real (prompt + response) and
    padding tokens forwarded, and the micro-batches each rank runs."""
    padding = forwarded - real
    return {"batch/real_tokens": real, "batch/padding_tokens": padding,
            "batch/padding_fraction": padding / forwarded if forwarded else 0.0,
            "batch/micro_batches_per_rank": float(micro_batches)}


# ---------------------------------------------------------------------------------------------
# The updater
# ---------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """One update's split of the batch for this rank."""

    local: list[TrainBatch]  # this DP rank's shard of each mini-batch
    denominators: list[LossDenominators]  # per mini-batch, over the whole (global) mini-batch
    lr_scales: list[float] | None = None  # VCPO: per mini-batch ESS learning-rate multiplier
    logit_grad_sq: torch.Tensor | None = None  # OPOB "logit" norms of the local rows (last stage)
    # --use-dynamic-batch-size: this rank's packed micro-batches, as row indices into local[j]
    # (per mini-batch) and into all local rows concatenated (the log-prob forwards)
    micro: list[list[list[int]]] | None = None
    logprob_micro: list[list[int]] | None = None
    tokens: dict[str, float] | None = None  # real / padding tokens and micro-batches per pass


def loss_config_from_args(args: argparse.Namespace) -> PolicyLossConfig:
    no_clip = bool(getattr(args, "no_ppo_clip", False))
    return PolicyLossConfig(
        eps_clip=None if no_clip else args.eps_clip,
        eps_clip_high=None if no_clip else args.eps_clip_high,
        clip_ratio_c=None if no_clip else args.dual_clip_c,
        loss_agg_mode=args.loss_agg_mode, entropy_coeff=args.entropy_coef,
        kl_coeff=args.kl_coef, kl_type=args.kl_type)


def passes_per_batch(args: argparse.Namespace) -> int:
    """Passes over a rollout batch while SFPO is on: K + 1 (SFPO with α > 0 and K > 0; K with
    ``--sfpo-no-slow-pass``) or E."""
    if args.algorithm == "sfpo" and args.sfpo_alpha > 0 and args.sfpo_inner_steps > 0:
        return args.sfpo_inner_steps + (0 if getattr(args, "sfpo_no_slow_pass", False) else 1)
    return args.ppo_epochs


def check_update_args(args: argparse.Namespace) -> None:
    """The update's flag combinations (``rl`` checks them at start-up, before building anything;
    :class:`PolicyUpdater` again)."""
    if args.algorithm not in ALGORITHMS:
        raise PolicyUpdateError(f"--algorithm must be one of {ALGORITHMS}, got "
                                f"{args.algorithm!r}")
    if args.num_steps_per_rollout < 1:
        raise PolicyUpdateError(f"--num-steps-per-rollout must be >= 1, got "
                                f"{args.num_steps_per_rollout}")
    if args.ppo_epochs < 1:
        raise PolicyUpdateError(f"--ppo-epochs must be >= 1, got {args.ppo_epochs}")
    if args.algorithm == "sfpo" and args.ppo_epochs > 1:
        raise PolicyUpdateError(
            f"--ppo-epochs {args.ppo_epochs} sets GRPO's passes over a rollout batch; --algorithm "
            f"sfpo makes its own (--sfpo-inner-steps {args.sfpo_inner_steps} fast passes + 1 slow "
            "pass, 1 pass once the entropy trigger fired): use --algorithm grpo --ppo-epochs E "
            "as SFPO's control, or --ppo-epochs 1")
    if getattr(args, "sfpo_no_slow_pass", False):
        if args.algorithm != "sfpo":
            raise PolicyUpdateError("--sfpo-no-slow-pass drops SFPO's Stage III: it needs "
                                    f"--algorithm sfpo, got --algorithm {args.algorithm}")
        if args.sfpo_inner_steps < 1:
            raise PolicyUpdateError("--sfpo-no-slow-pass needs --sfpo-inner-steps >= 1 (with 0 fast "
                                    "passes and no slow pass a step would not train)")
    if getattr(args, "use_dynamic_batch_size", False):
        if args.max_tokens_per_gpu is None or args.max_tokens_per_gpu < 1:
            raise PolicyUpdateError(f"--use-dynamic-batch-size needs --max-tokens-per-gpu N >= 1 "
                                    f"(the token budget of a micro-batch), got "
                                    f"{args.max_tokens_per_gpu}")
    elif getattr(args, "max_tokens_per_gpu", None) is not None:
        raise PolicyUpdateError(f"--max-tokens-per-gpu {args.max_tokens_per_gpu} is the budget of "
                                "--use-dynamic-batch-size's packed micro-batches: add "
                                "--use-dynamic-batch-size (or drop --max-tokens-per-gpu)")
    if args.no_ppo_clip and not args.allow_unclipped_multi_step:
        passes = passes_per_batch(args)
        steps = args.num_steps_per_rollout * passes
        if steps > 1:
            if args.algorithm == "grpo":
                how = f"--ppo-epochs {args.ppo_epochs}"
            elif passes > 1 and getattr(args, "sfpo_no_slow_pass", False):
                how = f"SFPO's --sfpo-inner-steps {args.sfpo_inner_steps} passes, no slow pass"
            elif passes > 1:
                how = f"SFPO's --sfpo-inner-steps {args.sfpo_inner_steps} + 1 passes"
            else:
                how = "1 pass"
            raise PolicyUpdateError(
                f"--no-ppo-clip with {steps} optimizer steps per rollout batch "
                f"(--num-steps-per-rollout {args.num_steps_per_rollout} x {how}) has no trust "
                "region: every step after the first is off-policy (its parameters have moved away "
                "from the policy that the samples and old log-probs come from) and, without the "
                "clip, nothing bounds the ratio pi / pi_old it trains on. Take one optimizer step "
                "per rollout batch (--num-steps-per-rollout 1, --ppo-epochs 1, --algorithm grpo), "
                "drop --no-ppo-clip, or pass --allow-unclipped-multi-step to run it anyway")


def controller_from_args(args: argparse.Namespace) -> SFPOController:
    return SFPOController(
        alpha0=args.sfpo_alpha if args.algorithm == "sfpo" else 0.0,
        window=args.sfpo_zscore_window, threshold=args.sfpo_zscore_threshold,
        two_sided=args.sfpo_zscore_two_sided, stop_step=args.sfpo_stop_step,
        inner_steps=args.sfpo_inner_steps)


class PolicyUpdater:
    """Runs one SFPO (or GRPO) update per rollout batch on a megatron ``TrainingSetup``.

    ``setup`` comes from ``train.model_setup.build_training_setup`` built **without**
    ``calculate_per_token_loss`` (the RL losses normalise over the whole mini-batch themselves).
    ``ref_model``: frozen reference-policy chunks (same layout), needed when ``--kl-coef`` > 0.
    ``stage_hook(stage, updater)``, if set, is called at ``"theta0"`` (snapshot taken),
    ``"thetaK"`` (after Stage I), ``"theta_tilde"`` (after Stage II) and ``"done"``; for
    instrumentation and tests.
    """

    def __init__(self, args: argparse.Namespace, setup, *, ref_model: Sequence | None = None,
                 pad_id: int | None = None) -> None:
        check_update_args(args)
        if not args.rollout_temperature > 0:
            raise PolicyUpdateError(f"--rollout-temperature must be > 0, got "
                                    f"{args.rollout_temperature}")
        if args.kl_coef > 0 and ref_model is None:
            raise PolicyUpdateError(f"--kl-coef {args.kl_coef} needs a reference policy: pass "
                                    "ref_model (see build_reference_model)")
        if getattr(setup.config, "calculate_per_token_loss", False):
            raise PolicyUpdateError("the RL update needs a training setup built without "
                                    "calculate_per_token_loss (its loss is already normalised "
                                    "over the mini-batch)")
        if ps.get_context_parallel_world_size() > 1:
            if not getattr(args, "use_dynamic_batch_size", False):
                raise PolicyUpdateError("context parallelism splits packed sequences: add "
                                        "--use-dynamic-batch-size --max-tokens-per-gpu N")
            if getattr(args, "off_policy_baseline", "none") == "opob" and \
                    getattr(args, "opob_grad_norm", "logit") == "exact":
                raise PolicyUpdateError("--opob-grad-norm exact takes per-trajectory gradients, which "
                                        "context parallelism splits over ranks: use --opob-grad-norm logit")
        check_supported(setup.optimizer)
        self.args = args
        self.setup = setup
        # MoE policies: router load balance and aux loss of each step's training passes
        self.router_stats = RouterStats(setup.model, setup.config) \
            if getattr(setup.config, "num_moe_experts", None) else None
        self.ref_model = list(ref_model) if ref_model is not None else None
        self.loss_config = loss_config_from_args(args)
        self.controller = controller_from_args(args)
        self.entropy_source = getattr(args, "sfpo_entropy_source", "global")
        if self.entropy_source not in ENTROPY_SOURCES:
            raise PolicyUpdateError(f"--sfpo-entropy-source must be one of {ENTROPY_SOURCES}, got "
                                    f"{self.entropy_source!r}")
        self.temperature = float(args.rollout_temperature)
        self.vocab_size = int(setup.arch.vocab_size)
        self.pad_id = int(pad_id if pad_id is not None else (setup.arch.raw.get("pad_token_id")
                                                             or 0))
        self.micro_batch_size = int(args.micro_batch_size)
        self.pack: PackSpec | None = None
        if getattr(args, "use_dynamic_batch_size", False):
            # Under PP every packed micro-batch is padded to the budget (fixed p2p shapes); T is
            # a multiple of the TP size (sequence parallelism splits it).
            self.pack = pack_spec(int(args.max_tokens_per_gpu), self.pad_id,
                                  ps.get_tensor_model_parallel_world_size(),
                                  ps.get_pipeline_model_parallel_world_size(),
                                  ps.get_context_parallel_world_size())
        self.num_mini_batches = int(args.num_steps_per_rollout)
        self.ppo_epochs = int(args.ppo_epochs)
        self.no_slow_pass = bool(getattr(args, "sfpo_no_slow_pass", False))
        self.loss_scale_factor = getattr(args, "rollout_max_response_len", None)
        self.snapshot_offload = bool(getattr(args, "sfpo_snapshot_offload", False))
        self.off_policy = OffPolicyConfig.from_args(args)
        self.stage_hook: Callable[[str, PolicyUpdater], None] | None = None
        self.last_passes: dict[str, list[dict[str, float]]] = {}
        self.snapshot: MainParamSnapshot | None = None

    # ---- checkpointed state ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Goes into the checkpoint's ``extra_state`` (plain Python values)."""
        return {"version": _STATE_VERSION, "algorithm": self.args.algorithm,
                "controller": self.controller.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise PolicyUpdateError(f"policy updater state version {state.get('version')!r} is "
                                    f"not {_STATE_VERSION}")
        self.controller.load_state_dict(state["controller"])

    # ---- the update ----------------------------------------------------------------------------
    def _hook(self, stage: str) -> None:
        if self.stage_hook is not None:
            self.stage_hook(stage, self)

    def _plan(self, batch: TrainBatch) -> _Plan:
        dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        check_update_layout(batch.size, self.num_mini_batches, dp_size,
                            1 if self.pack else self.micro_batch_size)
        scale = self.loss_scale_factor or batch.seq_length
        # Every rank holds the whole batch: the mini-batch constants need no communication.
        minis = batch.split(self.num_mini_batches, "mini-batches")
        dens = [mini_batch_denominators(mb.loss_mask, scale) for mb in minis]
        lengths = row_lengths(batch)
        real = float(sum(lengths))
        if self.pack is None:
            micro = len(minis) * (minis[0].size // dp_size // self.micro_batch_size)
            plan = _Plan(local_mini_batches(batch, self.num_mini_batches, dp_rank, dp_size), dens)
            plan.tokens = _token_metrics(real, float(batch.size * batch.seq_length), micro)
            return plan
        # Sequences as they sit in a pack (padded to 2 x CP chunks under context parallelism).
        lengths = [self.pack.segment_length(n) for n in lengths]
        check_budget(lengths, self.pack.max_tokens)
        # The plan is computed from the whole batch on every rank, so every rank knows every
        # rank's micro-batches (equal counts) without communication.
        per = minis[0].size
        shards = [[[j * per + i for i in s]
                   for s in balance_over_dp(lengths[j * per:(j + 1) * per], dp_size)]
                  for j in range(len(minis))]  # [mini-batch][rank] -> batch rows
        micro_per_mb = [pack_shards([[lengths[i] for i in s] for s in ranks], self.pack.max_tokens)
                        for ranks in shards]  # [mini-batch][rank][micro] -> shard positions
        # The log-prob forwards run over all of a rank's rows at once (no optimizer step between).
        mine = [[i for ranks in shards for i in ranks[k]] for k in range(dp_size)]
        logprob_micro = pack_shards([[lengths[i] for i in rows] for rows in mine],
                                    self.pack.max_tokens)
        forwarded = sum(self.pack.padded_length(sum(lengths[ranks[k][p]] for p in mb))
                        for ranks, per_rank in zip(shards, micro_per_mb)
                        for k in range(dp_size) for mb in per_rank[k])
        plan = _Plan([batch.index_select(ranks[dp_rank]) for ranks in shards], dens,
                     micro=[per_rank[dp_rank] for per_rank in micro_per_mb],
                     logprob_micro=logprob_micro[dp_rank])
        plan.tokens = _token_metrics(real, float(forwarded),
                                     sum(len(per_rank[0]) for per_rank in micro_per_mb))
        return plan

    def _micro_batches(self, plan: _Plan, j: int, mb: TrainBatch) -> list:
        if plan.micro is None:
            return mb.micro_batches(self.micro_batch_size)
        return [pack_rows(mb, rows, self.pack) for rows in plan.micro[j]]

    def _old_logprobs(self, plan: _Plan) -> dict[str, float]:
        """θ(s,0) (and reference-policy) log-probs of this rank's rows, once per update."""
        local = TrainBatch.concat(plan.local)
        kwargs = dict(micro_batch_size=self.micro_batch_size, temperature=self.temperature,
                      vocab_size=self.vocab_size, packing=plan.logprob_micro, pack=self.pack)
        # OPOB's "logit" gradient norms come from this same forward (no extra pass).
        folded = self.off_policy.opob and self.off_policy.grad_norm == "logit"
        old = compute_logprobs(self.setup.model, local, logit_grad_sq=folded, **kwargs)
        plan.logit_grad_sq = None if old is None else old.logit_grad_sq
        ref = compute_logprobs(self.ref_model, local, **kwargs) if self.ref_model else None
        rows, seq_diffs = [], []
        if old is not None:
            local.old_logprobs = old.logprobs
            if ref is not None:
                local.ref_logprobs = ref.logprobs
            mask = local.loss_mask.to(old.logprobs.device)
            if self.off_policy.track:
                local.log_weights = sequence_log_ratio(
                    old.logprobs, local.rollout_logprobs.to(old.logprobs.device), mask).cpu()
            signed = old.logprobs - local.rollout_logprobs.to(old.logprobs.device)
            diff = signed.abs()
            rows.append(torch.stack([diff[mask].sum(), old.entropy[mask].sum(),
                                     mask.sum().to(diff.dtype)]))
            # Per trajectory: |sum over its trained tokens| (multi-turn: tool output excluded).
            seq_diffs.append((signed * mask).sum(dim=-1).abs().max())
        plan.local = local.split(self.num_mini_batches, "mini-batches")
        total = _reduce_sums(rows, 3)
        n = max(float(total[2]), 1.0)
        return {"rollout/train_logprob_abs_diff": float(total[0]) / n,
                "rollout/train_logprob_seq_abs_diff_max": _reduce_max(seq_diffs),
                "actor/entropy_at_theta0": float(total[1]) / n}

    def _grad_sq_norms(self, plan: _Plan, local: TrainBatch) -> torch.Tensor | None:
        """OPOB's ‖g‖² of this rank's rows (None off the last stage in logit mode)."""
        if self.off_policy.grad_norm == "exact":  # collective: every rank runs the backward
            return trajectory_grad_sq_norms(self.setup, local, temperature=self.temperature,
                                            vocab_size=self.vocab_size)
        return plan.logit_grad_sq  # from the old-log-prob forward (_old_logprobs)

    def _train_loss(self, den: LossDenominators, scale: float, mb: TrainBatch,
                    logprobs: torch.Tensor, entropy: torch.Tensor):
        dev = logprobs.device
        ref = None if mb.ref_logprobs is None else mb.ref_logprobs.to(dev)
        seq_weights = None
        if self.off_policy.vcpo:  # VCPO: sequence-level truncated IS on the policy gradient
            seq_weights = truncated_is_weights(mb.log_weights, self.off_policy.tis_threshold).to(dev)
        loss, m = policy_loss(logprobs, mb.old_logprobs.to(dev), mb.advantages.to(dev),
                              mb.loss_mask.to(dev), self.loss_config, entropy=entropy,
                              ref_log_probs=ref, seq_weights=seq_weights, denominators=den)
        n = m["num_tokens"]
        kl = m.get("kl", torch.zeros((), device=dev))
        # The reference's series counts DP rank 0's micro-batches that hold a response token.
        counted = (n > 0).to(n.dtype) * float(ps.get_data_parallel_rank() == 0)
        stats = torch.stack([m["pg_loss"], m["pg_clipfrac"] * n, m["pg_clipfrac_lower"] * n,
                             m["ppo_kl"] * n, m["entropy"] * n, kl * n, n,
                             loss.detach(), m["entropy"] * counted, counted]).double()
        # The schedule divides by the micro-batch count and DDP averages over DP: undo both so
        # the summed gradients are those of the mini-batch loss (algorithms/losses.py).
        return loss * scale, stats

    def _pass(self, plan: _Plan) -> list[dict[str, float]]:
        """One ordinary GRPO/PPO pass: one optimizer step per mini-batch."""
        setup, rows = self.setup, []
        dp_size = ps.get_data_parallel_world_size()
        for j, (mb, den) in enumerate(zip(plan.local, plan.denominators)):
            zero_grads(setup)
            micro = self._micro_batches(plan, j, mb)
            out = run_micro_batches(
                setup.model, micro, partial(self._train_loss, den, float(len(micro) * dp_size)),
                forward_only=False, temperature=self.temperature, vocab_size=self.vocab_size)
            with scaled_lr(setup.optimizer, plan.lr_scales[j] if plan.lr_scales else 1.0):
                ok, grad_norm, _ = setup.optimizer.step()
            if not ok:
                raise FloatingPointError("optimizer step skipped (non-finite gradients)")
            row = _pass_metrics(_reduce_sums(out, _NUM_STATS))
            row["grad_norm"] = float(grad_norm or 0.0)
            rows.append(row)
        return rows

    def update(self, batch: Sequence[Sample] | TrainBatch, step: int) -> dict[str, float]:
        """One SFPO / GRPO update on rollout batch ``step`` (the same whole batch on every rank;
        each rank trains on its DP shard). Returns the step's metrics (equal on every rank)."""
        t_start = time.perf_counter()
        last = self.controller.last_step
        if last is not None and step <= last:
            raise PolicyUpdateError(f"update(step={step}) after step {last}: steps must increase")
        if not isinstance(batch, TrainBatch):
            batch = collate(list(batch), self.pad_id)
        plan = self._plan(batch)
        alpha = self.controller.alpha_for_step(step)
        inner = self.controller.inner_steps_for_step(step)
        lr = float(self.setup.optimizer.param_groups[0]["lr"])
        metrics: dict[str, float] = self._old_logprobs(plan)
        metrics.update(plan.tokens or {})
        if self.off_policy.track:
            off_metrics, plan.lr_scales = off_policy_correction(
                self.off_policy, plan.local, grad_sq=partial(self._grad_sq_norms, plan),
                advantage_eps=self.args.advantage_eps,
                std_normalize=not self.args.disable_std_normalization)
            metrics.update(off_metrics)
        t_old = time.perf_counter()
        self.last_passes = {}
        fast_norm = repo_norm = 0.0
        snapshot_bytes = 0
        if alpha > 0.0:
            self.snapshot = MainParamSnapshot(self.setup.optimizer, self.snapshot_offload)
            try:
                snapshot_bytes = self.snapshot.nbytes
                self._hook("theta0")
                for k in range(inner):  # Stage I
                    self.last_passes[f"fast{k}"] = self._pass(plan)
                fast_norm = self.snapshot.distance()
                self._hook("thetaK")
                self.snapshot.reposition_(alpha)  # Stage II
                copy_main_to_model_params(self.setup.optimizer)
                repo_norm = self.snapshot.distance()
                self._hook("theta_tilde")
            finally:
                self.snapshot = None  # free the θ(s,0) copy before Stage III
        t_fast = time.perf_counter()
        # Stage III, or the GRPO step: one pass, or --ppo-epochs passes (GRPO only); none after
        # the reposition with --sfpo-no-slow-pass (once the trigger fired the step is GRPO's pass).
        names = ["slow"] if self.ppo_epochs == 1 else [f"epoch{e}" for e in range(self.ppo_epochs)]
        if alpha > 0.0 and self.no_slow_pass:
            names = []
        for name in names:
            self.last_passes[name] = self._pass(plan)
        last_name = list(self.last_passes)[-1]
        slow = self.last_passes[last_name]  # the last pass: the step's actor metrics, entropy
        self.setup.scheduler.step(increment=1)
        finish_param_gather(self.setup.optimizer)
        t_end = time.perf_counter()

        total_tokens = sum(r["num_tokens"] for r in slow) or 1.0
        entropies = {
            "global": sum(r["entropy"] * r["num_tokens"] for r in slow) / total_tokens,
            "reference": (sum(r["dp0_micro_batch_entropy_sum"] for r in slow)
                          / (sum(r["dp0_micro_batches"] for r in slow) or 1.0)),
        }
        entropy = entropies[self.entropy_source]
        z = self.controller.observe(step, entropy)
        metrics.update({
            "sfpo/alpha": alpha, "sfpo/inner_steps": float(inner),
            "sfpo/fast_displacement_norm": fast_norm, "sfpo/reposition_norm": repo_norm,
            "sfpo/entropy": entropy,
            "sfpo/entropy_global": entropies["global"],
            "sfpo/entropy_reference": entropies["reference"],
            "sfpo/entropy_zscore": float("nan") if z is None else z,
            "sfpo/trigger_step": -1.0 if self.controller.trigger_step is None
            else float(self.controller.trigger_step),
            "sfpo/snapshot_bytes": float(snapshot_bytes),
            "actor/passes": float(len(self.last_passes)),
            "lr": lr,
            "lr_effective": lr * (sum(plan.lr_scales) / len(plan.lr_scales) if plan.lr_scales else 1.0),
            # time/slow_s: Stage III, or all of the GRPO step's passes.
            "time/old_logprobs_s": t_old - t_start, "time/fast_and_reposition_s": t_fast - t_old,
            "time/slow_s": t_end - t_fast, "time/update_s": t_end - t_start,
        })
        for key in ("pg_loss", "pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "entropy", "kl"):
            metrics[f"actor/{key}"] = (sum(r[key] * r["num_tokens"] for r in slow) / total_tokens
                                       if key != "pg_loss" else
                                       sum(r[key] for r in slow) / len(slow))
        for name, rows in self.last_passes.items():
            metrics[f"actor/grad_norm/{name}"] = sum(r["grad_norm"] for r in rows) / len(rows)
            metrics[f"actor/pg_clipfrac/{name}"] = (
                sum(r["pg_clipfrac"] * r["num_tokens"] for r in rows)
                / (sum(r["num_tokens"] for r in rows) or 1.0))
        metrics["actor/grad_norm"] = metrics[f"actor/grad_norm/{last_name}"]
        if self.router_stats is not None:
            metrics.update(self.router_stats.collect())
        self._hook("done")
        return metrics
