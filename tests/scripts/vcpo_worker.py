"""torchrun / single-process worker for tests/test_vcpo_update.py: the VCPO update on megatron.

Scenarios (each from the same HF weights; results written by global rank 0 to ``<out>/<name>.pt``):

* ``onpolicy``: two SFPO updates with the rollout log-probs set to the trainer's own log-probs at
  θ(s,0), so every importance weight is exactly 1 — once without VCPO, once with ``--vcpo`` (sqrt
  ESS scaling, truncated IS): the final parameters must be equal bit for bit.
* ``known_w`` / ``known_w_dp2``: one GRPO update whose rollout log-probs are the trainer's minus
  δ_i on one response token, so log w_i = δ_i (known). ``--vcpo --ess-lr-scaling sqrt`` vs
  ``--vcpo --ess-lr-scaling none --lr lr·scale`` with scale computed here from δ: the same
  parameters bit for bit, and the logged ESS / ρ / scale equal the closed form.

    python vcpo_worker.py --hf DIR --out DIR --scenarios onpolicy,known_w
* ``opob`` / ``opob_dp2``: one GRPO update with ``--off-policy-baseline opob`` (exact gradient
  norms) on those weights, and the same without OPOB.

    torchrun --nproc_per_node 2 vcpo_worker.py --hf DIR --out DIR --scenarios known_w_dp2,opob_dp2
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from sfpo_common import DELTAS, RHO_BASE, build_setup, closed_form, make_samples, rl_args, run_worker
from sfpo_worker import hf_params, reinit

BASE = {"--lr-decay-style": "constant", "--num-steps-per-rollout": "1"}


def own_logprob_samples(setup, args, arch, step: int, deltas: list[float] | None = None) -> list:
    """make_samples(step) with rollout log-probs := the trainer's log-probs at the current θ
    (minus δ_i on the first response token of sample i)."""
    from sfpo_megatron.trainer.policy_forward import compute_logprobs
    from sfpo_megatron.trainer.train_batch import collate

    samples = make_samples(step)
    batch = collate(samples, 0)
    # Every rank computes the whole batch (same micro-batching as the updater at DP1); with DP2
    # the values of a row do not depend on which rows share its micro-batch (rows are independent).
    from megatron.core import parallel_state as ps

    res = compute_logprobs(setup.model, batch, micro_batch_size=args.micro_batch_size,
                           temperature=args.rollout_temperature, vocab_size=arch.vocab_size)
    lp = res.logprobs if res is not None else torch.zeros_like(batch.rollout_logprobs)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise RuntimeError("this worker runs without pipeline parallelism")
    for i, s in enumerate(samples):
        p = len(s.prompt_ids)
        row = lp[i, p - 1:p - 1 + len(s.response_ids)].tolist()
        if deltas is not None:
            row[0] = float(torch.tensor(row[0], dtype=torch.float32) - deltas[i])
        s.rollout_logprobs = row
    return samples


def expected_opob_shift(setup, args, arch, samples: list, label: str) -> float:
    """mean |A_opob − A_grpo| over the batch, from the standalone gradient-norm functions on this
    rank's view of the whole batch and the known log-weights δ."""
    from sfpo_megatron.algorithms.advantages import group_normalized_advantages
    from sfpo_megatron.algorithms.vcpo import opob_advantages
    from sfpo_megatron.trainer.train_batch import collate
    from sfpo_megatron.trainer.trajectory_grad_norms import logit_grad_sq_norms, trajectory_grad_sq_norms

    batch = collate(samples, 0)
    kw = dict(temperature=args.rollout_temperature, vocab_size=arch.vocab_size)
    g2 = (trajectory_grad_sq_norms(setup, batch, **kw) if label == "opob" else
          logit_grad_sq_norms(setup.model, batch, micro_batch_size=args.micro_batch_size, **kw))
    rewards = [s.reward for s in samples]
    groups = [s.group_id for s in samples]
    # exact norms: the VCPO reference's population std (algorithms/vcpo.py)
    opob = opob_advantages(torch.tensor(rewards), torch.exp(torch.tensor(DELTAS, dtype=torch.float64)), g2,
                           groups, std="population" if label == "opob" else "unbiased")
    grpo = group_normalized_advantages(rewards, groups).double()
    return float((opob - grpo).abs().mean())


TIS_LOW = 1.2  # below exp(0.5): also truncates sample 2 (delta 0.5), which has a nonzero advantage


def scenario(name: str, hf: Path) -> dict:
    from sfpo_megatron.update.policy_update import PolicyUpdater

    reinit(1, 1, 3)
    dp_flags = ("--use-distributed-optimizer",) if name.endswith("dp2") else ()
    out: dict = {}
    if name == "onpolicy":
        for label, flags in (("plain", ()), ("vcpo", ("--vcpo",))):
            args = rl_args(hf, {**BASE, "--ess-lr-scaling": "sqrt"}, flags)
            setup, arch = build_setup(args, hf)
            updater = PolicyUpdater(args, setup)
            out[f"{label}_metrics"] = [updater.update(own_logprob_samples(setup, args, arch, s), s)
                                       for s in (1, 2)]
            out[label] = hf_params(setup, hf)
            del updater, setup
            gc.collect()
        return out
    if name.startswith("opob"):
        # OPOB with known weights, exact and logit gradient norms: the update's advantage shift
        # equals the one computed here from the standalone norm functions; the same update at
        # DP1 and DP2 (groups straddle the DP shards), and without OPOB for contrast.
        for label, flags in (("opob", ("--off-policy-baseline", "opob", "--opob-grad-norm", "exact")),
                             ("opob_logit", ("--off-policy-baseline", "opob", "--opob-grad-norm", "logit")),
                             ("plain", ())):
            args = rl_args(hf, {**BASE, "--algorithm": "grpo"}, ("--vcpo", *dp_flags, *flags))
            setup, arch = build_setup(args, hf)
            updater = PolicyUpdater(args, setup)
            samples = own_logprob_samples(setup, args, arch, 1, DELTAS)
            if label != "plain":
                out[f"{label}_expected_shift"] = expected_opob_shift(setup, args, arch, samples, label)
            out[f"{label}_metrics"] = updater.update(samples, 1)
            out[label] = hf_params(setup, hf)
            del updater, setup
            gc.collect()
        return out
    # known_w: the correction with the scaled LR vs the same correction at lr · scale
    cf = closed_form(DELTAS)
    out["closed_form"] = cf
    lr = float(rl_args(hf, BASE).lr)
    for label in ("scaled", "manual"):
        # The manual run takes the scale the first one computed (from the actual float32
        # log-probs; the closed form above is checked against it with a tolerance).
        over = ({"--ess-lr-scaling": "sqrt"} if label == "scaled" else
                {"--ess-lr-scaling": "none", "--lr": repr(lr * out["scaled_metrics"]["vcpo/lr_scale"])})
        args = rl_args(hf, {**BASE, "--algorithm": "grpo", "--ess-rho-base": str(RHO_BASE), **over},
                       ("--vcpo", *dp_flags))
        setup, arch = build_setup(args, hf)
        updater = PolicyUpdater(args, setup)
        out[f"{label}_metrics"] = updater.update(own_logprob_samples(setup, args, arch, 1, DELTAS), 1)
        out[label] = hf_params(setup, hf)
        out[f"{label}_lr_after"] = [g["lr"] for g in setup.optimizer.param_groups]
        del updater, setup
        gc.collect()
    # The same scaled update with a lower truncation threshold for the IS weights.
    args = rl_args(hf, {**BASE, "--algorithm": "grpo", "--ess-rho-base": str(RHO_BASE),
                        "--ess-lr-scaling": "sqrt", "--tis-threshold": str(TIS_LOW)}, ("--vcpo", *dp_flags))
    setup, arch = build_setup(args, hf)
    updater = PolicyUpdater(args, setup)
    out["tis_low_metrics"] = updater.update(own_logprob_samples(setup, args, arch, 1, DELTAS), 1)
    out["tis_low"] = hf_params(setup, hf)
    return out


if __name__ == "__main__":
    run_worker(lambda name, hf, out: scenario(name, hf))
