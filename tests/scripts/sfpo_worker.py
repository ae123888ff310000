"""torchrun / single-process worker for tests/test_sfpo_update.py.

Runs the named scenarios one after the other in this process group (megatron's model-parallel
state is rebuilt for each layout) and writes, from global rank 0, ``<out>/<scenario>.pt``: the
final parameters in HF naming (full tensors), per-step metrics and scenario-specific checks.

    python sfpo_worker.py --hf DIR --out DIR --scenarios dp1,grpo,...
    torchrun --nproc_per_node 2 sfpo_worker.py --hf DIR --out DIR --scenarios dp2,tp2,pp2,...
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch
import torch.distributed as dist
from sfpo_common import build_setup, make_samples, rl_args, run_worker

STEPS = 2
LAYOUTS = {  # scenario → (tp, pp, extra flags, setting overrides)
    "dp1": (1, 1, (), {}),
    "grpo": (1, 1, (), {"--algorithm": "grpo"}),
    "alpha0": (1, 1, (), {"--sfpo-alpha": "0"}),
    "k0a1": (1, 1, (), {"--sfpo-inner-steps": "0", "--sfpo-alpha": "1"}),
    # --ppo-epochs 4 GRPO vs SFPO with α = 1, K = 3 and the entropy trigger off: the same passes.
    "grpo_e4": (1, 1, (), {"--algorithm": "grpo", "--ppo-epochs": "4"}),
    "k3a1": (1, 1, (), {"--sfpo-inner-steps": "3", "--sfpo-alpha": "1",
                        "--sfpo-zscore-threshold": "1e9"}),
    "kl": (1, 1, (), {"--kl-coef": "0.05", "--kl-type": "low_var_kl"}),
    "resume": (1, 1, (), {"--sfpo-zscore-window": "2", "--sfpo-zscore-threshold": "-1e9"}),
    "bf16": (1, 1, ("--bf16",), {}),
    "errors": (1, 1, (), {}),
    "dp2": (1, 1, ("--use-distributed-optimizer", "--sfpo-snapshot-offload"), {}),
    "dp2_grpo": (1, 1, ("--use-distributed-optimizer",), {"--algorithm": "grpo"}),
    "dp2_k0a1": (1, 1, ("--use-distributed-optimizer",),
                 {"--sfpo-inner-steps": "0", "--sfpo-alpha": "1"}),
    "dp2_entropy_reference": (1, 1, ("--use-distributed-optimizer",),
                              {"--sfpo-entropy-source": "reference"}),
    "dp2_overlap": (1, 1, ("--use-distributed-optimizer", "--overlap-grad-reduce",
                           "--overlap-param-gather"), {}),
    "tp2": (2, 1, (), {}),
    "pp2": (1, 2, (), {}),
    "bf16_dp2": (1, 1, ("--bf16", "--use-distributed-optimizer"), {}),
    # tests/test_flag_cases_update.py: one flag (group) each, against the reference.
    "eps_high": (1, 1, (), {"--eps-clip-high": "5"}),
    "dual_clip": (1, 1, (), {"--dual-clip-c": "1.02"}),
    "agg_seq": (1, 1, (), {"--loss-agg-mode": "seq-mean-token-mean"}),
    "agg_norm": (1, 1, (), {"--loss-agg-mode": "seq-mean-token-sum-norm"}),
    "no_clip": (1, 1, ("--no-ppo-clip", "--allow-unclipped-multi-step"), {}),
    "recompute": (1, 1, ("--recompute-activations",), {}),
    "adam": (1, 1, (), {"--adam-beta1": "0.5", "--adam-beta2": "0.9", "--adam-eps": "1e-3",
                        "--weight-decay": "0.3", "--clip-grad": "0.05"}),
    "stop_step": (1, 1, (), {"--sfpo-stop-step": "1"}),
    "one_sided": (1, 1, (), {"--sfpo-zscore-window": "2", "--sfpo-zscore-threshold": "0.5"}),
    "two_sided": (1, 1, ("--sfpo-zscore-two-sided",),
                  {"--sfpo-zscore-window": "2", "--sfpo-zscore-threshold": "0.5"}),
    "eps_clip": (1, 1, (), {"--eps-clip": "0.05"}),
    "kl_k3": (1, 1, (), {"--kl-coef": "0.05", "--kl-type": "k3"}),
    "kl_low_var": (1, 1, (), {"--kl-coef": "0.05", "--kl-type": "low_var_kl"}),
    "offload": (1, 1, ("--sfpo-snapshot-offload",), {}),
    "cpu_offload": (1, 1, ("--use-distributed-optimizer", "--optimizer-cpu-offload"), {}),
    # rl's model and DDP flags, and its --load flags (rl/state.py:init_policy).
    "rl_arch": (1, 1, ("--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"),
                {"--make-vocab-size-divisible-by": "96"}),
    "rl_init": (1, 1, (), {}),
}
ONE_STEP = {"grpo", "alpha0", "k0a1", "dp2_grpo", "dp2_k0a1"}


def reinit(tp: int, pp: int, seed: int, cp: int = 1) -> None:
    from megatron.core import parallel_state as ps

    from sfpo_megatron.distributed import parallel

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    parallel.initialize(tp=tp, pp=pp, seed=seed, cp=cp)


def hf_params(setup, hf: Path) -> dict[str, torch.Tensor]:
    from sfpo_megatron.conversion.hf_mapping import iter_hf_weights

    return {n: t.detach().float().cpu().clone()
            for n, t in iter_hf_weights(setup.model, str(hf))}


def old_logprobs_at_theta0(setup, args, arch, batch) -> torch.Tensor | None:
    """compute_logprobs on the whole batch; returned by the rank that holds them (TP/DP rank 0
    of the last stage), None elsewhere."""
    from megatron.core import parallel_state as ps

    from sfpo_megatron.trainer.policy_forward import compute_logprobs

    res = compute_logprobs(setup.model, batch, micro_batch_size=args.micro_batch_size,
                           temperature=args.rollout_temperature, vocab_size=arch.vocab_size)
    if res is None or ps.get_tensor_model_parallel_rank() or ps.get_data_parallel_rank():
        return None
    return res.logprobs.cpu()


def to_rank0(obj):
    """Send a picklable object from whichever rank has it (not None) to global rank 0."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return next((g for g in gathered if g is not None), None)


# ---- bf16: where the reposition lands ------------------------------------------------------


def _model_main_pairs(opt):
    """(this rank's bf16 model-param elements, their fp32 main params), flattened."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if isinstance(opt, DistributedOptimizer):
        for mg, sg in zip(opt.model_float16_groups, opt.shard_fp32_from_float16_groups):
            for mp, sp in zip(mg, sg):
                r = opt._get_model_param_range_map(mp)["param"]
                yield mp.detach().view(-1)[r.start:r.end], sp.detach().view(-1)
    else:  # Float16OptimizerWithFloat16Params
        for mg, sg in zip(opt.float16_groups, opt.fp32_from_float16_groups):
            for mp, sp in zip(mg, sg):
                yield mp.detach().view(-1), sp.detach().view(-1)


def bf16_recorder(alpha: float, checks: list):
    from megatron.core import parallel_state as ps

    from sfpo_megatron.trainer.main_params import inner_optimizers

    rec: dict = {}

    def snap(updater):
        return [(m.clone(), s.clone()) for opt in inner_optimizers(updater.setup.optimizer)
                for m, s in _model_main_pairs(opt)]

    def hook(stage: str, updater) -> None:
        if stage in ("theta0", "thetaK"):
            rec[stage] = snap(updater)
            return
        if stage != "theta_tilde":
            return
        tilde = snap(updater)
        out = {"elements": 0, "model_dtype_bf16": True, "main_is_lerp_of_main": True,
               "model_is_bf16_of_main": True, "naive_bf16_lerp_differs": 0,
               "naive_fp32_lerp_of_bf16_differs": 0, "main0_differs_from_bf16": 0}
        for (m0, s0), (mk, sk), (mt, st) in zip(rec["theta0"], rec["thetaK"], tilde):
            out["elements"] += mt.numel()
            out["model_dtype_bf16"] &= mt.dtype == torch.bfloat16 and st.dtype == torch.float32
            out["main_is_lerp_of_main"] &= torch.equal(st, torch.lerp(s0, sk, alpha))
            out["model_is_bf16_of_main"] &= torch.equal(mt, st.to(torch.bfloat16))
            out["naive_bf16_lerp_differs"] += int((torch.lerp(m0, mk, alpha) != mt).sum())
            naive32 = torch.lerp(m0.float(), mk.float(), alpha).to(torch.bfloat16)
            out["naive_fp32_lerp_of_bf16_differs"] += int((naive32 != mt).sum())
            out["main0_differs_from_bf16"] += int((s0 != m0.float()).sum())
        # Every DP rank must hold the same full bf16 model after the all-gather.
        flat = torch.cat([p.detach().float().view(-1) for c in updater.setup.model
                          for p in c.parameters()])
        ref = flat.clone()
        dist.broadcast(ref, src=dist.get_global_rank(ps.get_data_parallel_group(), 0),
                       group=ps.get_data_parallel_group())
        out["dp_replicas_equal"] = bool(torch.equal(flat, ref))
        checks.append(out)

    return hook


# ---- scenarios ---------------------------------------------------------------------------------


def run_steps(updater, steps, metrics: list) -> None:
    for step in steps:
        metrics.append(updater.update(make_samples(step), step))


def scenario(name: str, hf: Path, out: Path) -> dict:
    from sfpo_megatron.trainer.train_batch import collate
    from sfpo_megatron.update.policy_update import PolicyUpdater

    tp, pp, flags, overrides = LAYOUTS[name]
    args = rl_args(hf, {**overrides, "--tensor-model-parallel-size": str(tp),
                        "--pipeline-model-parallel-size": str(pp)}, flags)
    reinit(tp, pp, args.seed)
    setup, arch = build_setup(args, hf)
    result: dict = {"metrics": [], "checks": {}}
    if name == "errors":
        return errors(args, setup, arch, hf)
    if name == "rl_arch":
        return rl_arch(args, setup)
    if name == "rl_init":
        return rl_init(args, setup, hf, out)
    result["old_logprobs"] = to_rank0(
        old_logprobs_at_theta0(setup, args, arch, collate(make_samples(1), 0)))
    ref_model = None
    if name.startswith("kl"):
        ref_model = reference_model_via_checkpoint(args, arch, setup, out)
    updater = PolicyUpdater(args, setup, ref_model=ref_model)
    if name.startswith("bf16"):
        result["checks"]["bf16"] = []
        updater.stage_hook = bf16_recorder(args.sfpo_alpha, result["checks"]["bf16"])
    if name == "resume":
        return resume(args, setup, updater, hf, out, result)
    if name in ("dp1", "offload"):  # where θ0's snapshot of the main params lives
        updater.stage_hook = snapshot_recorder(result)
    # Transformer-layer forward calls: full activation recompute runs each one again in backward.
    layer_calls = [0]
    hooks = [m.register_forward_hook(lambda *_: layer_calls.__setitem__(0, layer_calls[0] + 1))
             for c in setup.model for m in c.modules() if type(m).__name__ == "TransformerLayer"]
    run_steps(updater, range(1, 2 if name in ONE_STEP else STEPS + 1), result["metrics"])
    for h in hooks:
        h.remove()
    result["layer_forwards"] = layer_calls[0]
    # Transformer layers in rank 0's model chunks: the pipeline split as built from the flags.
    result["local_layers"] = len(hooks)

    result["passes"] = updater.last_passes
    from sfpo_megatron.trainer.main_params import inner_optimizers
    result["adam"] = [type(opt.optimizer).__name__ for opt in inner_optimizers(setup.optimizer)]
    result["entropy_history"] = updater.controller.state_dict()["history"]
    result["params"] = hf_params(setup, hf)
    return result


def snapshot_recorder(result: dict):
    def hook(stage: str, updater) -> None:
        if stage == "theta0":
            copies = [c for _, _, cs in updater.snapshot.groups for c in cs]
            params = [p for _, ps_, _ in updater.snapshot.groups for p in ps_]
            result["snapshot"] = {"offload": updater.snapshot_offload,
                                  "devices": sorted({str(c.device) for c in copies}),
                                  "param_devices": sorted({str(p.device) for p in params}),
                                  "pinned": all(c.is_pinned() for c in copies)}

    return hook


def rl_arch(args, setup) -> dict:
    """What ``build_training_setup`` made of rl's model / DDP flags (as ``RLRun.setup``)."""
    from sfpo_megatron.models.hf_config import load_hf_config
    from sfpo_megatron.trainer.model_setup import build_training_setup, unwrap

    setup = build_training_setup(args, load_hf_config(args.model_config), total_scheduler_steps=1)
    chunk = setup.model[0]
    gpt = unwrap(chunk)
    return {"num_layers": len(gpt.decoder.layers), "hidden_size": gpt.config.hidden_size,
            "embedding_rows": gpt.embedding.word_embeddings.weight.shape[0],
            "overlap_grad_reduce": chunk.ddp_config.overlap_grad_reduce,
            "overlap_param_gather": chunk.ddp_config.overlap_param_gather,
            "param_sync_func": setup.config.param_sync_func is not None,
            "no_sync_func": setup.config.no_sync_func is not None}


def _adam_state(setup) -> float:
    """Σ|exp_avg| over this rank's Adam state (0 for a fresh optimizer)."""
    from sfpo_megatron.trainer.main_params import inner_optimizers

    total = 0.0
    for opt in inner_optimizers(setup.optimizer):
        base = getattr(opt, "optimizer", opt)
        for state in base.state.values():
            if "exp_avg" in state:
                total += float(state["exp_avg"].abs().sum())
    return total


def rl_init(args, setup, hf: Path, out: Path) -> dict:
    """One update, an RL checkpoint (as ``RLRun.save`` writes it: extra_state["rl"]); then, for
    each of rl's --load flags, a fresh setup with those flags parsed by rl's parser and
    ``init_policy``: the run state, Adam state, weights and RNG it gives."""
    from sfpo_megatron.components.checkpoint import save_checkpoint
    from sfpo_megatron.rl.state import STATE_KEY, STATE_VERSION, init_policy
    from sfpo_megatron.update.policy_update import PolicyUpdater

    ckpt = out / "rl_init_ckpt"
    updater = PolicyUpdater(args, setup)
    updater.update(make_samples(1), 1)
    rl_state = {"version": STATE_VERSION, "step": 1, "weight_version": 1, "sampler": None,
                "updater": updater.state_dict(), "reward_errors": 0, "reward_timeouts": 0}
    torch.manual_seed(1234567)  # the RNG state the checkpoint carries
    saved_rng = torch.get_rng_state()
    save_checkpoint(str(ckpt), 1, setup.model, setup.optimizer, setup.scheduler, {STATE_KEY: rl_state})
    result = {"saved": {"params": hf_params(setup, hf), "adam": _adam_state(setup), "rng": saved_rng}}
    for name, flags in (("resume", ()), ("finetune", ("--finetune",)), ("no_optim", ("--no-load-optim",)),
                        ("no_rng", ("--no-load-rng",))):
        load_args = rl_args(hf, {"--load": str(ckpt)}, flags)
        fresh, arch = build_setup(load_args, hf)
        torch.manual_seed(7)  # the process's own RNG state
        own_rng = torch.get_rng_state()
        state = init_policy(load_args, fresh, arch)
        result[name] = {"step": state.step, "weight_version": state.weight_version,
                        "adam": _adam_state(fresh), "params": hf_params(fresh, hf),
                        "rng_is_saved": torch.equal(torch.get_rng_state(), saved_rng),
                        "rng_is_own": torch.equal(torch.get_rng_state(), own_rng)}
        del fresh
        gc.collect()
    return result


def reference_model_via_checkpoint(args, arch, setup, out: Path) -> list:
    """Save the initial policy (iteration 0) and load it as the frozen reference policy."""
    from sfpo_megatron.components.checkpoint import save_checkpoint
    from sfpo_megatron.trainer.model_setup import build_reference_model

    init = out / "kl_init_ckpt"
    save_checkpoint(str(init), 0, setup.model)
    return build_reference_model(args, arch, str(init))


def resume(args, setup, updater, hf: Path, out: Path, result: dict) -> dict:
    """Steps 1-2 (the trigger fires at step 2), checkpoint, step 3; then a fresh setup resumes
    from the checkpoint and runs steps 3 and 4."""
    from sfpo_megatron.components.checkpoint import load_checkpoint, save_checkpoint
    from sfpo_megatron.update.policy_update import PolicyUpdater

    ckpt = out / "resume_ckpt"
    run_steps(updater, (1, 2), result["metrics"])
    save_checkpoint(str(ckpt), 2, setup.model, setup.optimizer, setup.scheduler,
                    {"policy_updater": updater.state_dict()})
    run_steps(updater, (3,), result["metrics"])
    result["params_continued"] = hf_params(setup, hf)
    del updater, setup
    gc.collect()
    setup2, _ = build_setup(args, hf)  # initial weights: the checkpoint must overwrite them
    updater2 = PolicyUpdater(args, setup2)
    loaded = load_checkpoint(str(ckpt), setup2.model, setup2.optimizer, setup2.scheduler)
    updater2.load_state_dict(loaded.extra_state["policy_updater"])
    result["resumed_state"] = updater2.state_dict()
    result["resumed_metrics"] = []
    run_steps(updater2, (3,), result["resumed_metrics"])
    result["params"] = hf_params(setup2, hf)
    run_steps(updater2, (4,), result["resumed_metrics"])
    return result


def errors(args, setup, arch, hf: Path) -> dict:
    """Bad settings and batches: the exception type and message of each."""
    from sfpo_megatron.update.policy_update import PolicyUpdater

    found = {}

    def catch(key, fn):
        try:
            fn()
            found[key] = None
        except Exception as e:  # noqa: BLE001 - recorded for the test to assert on
            found[key] = (type(e).__name__, str(e), isinstance(e, ValueError))

    kl_args = rl_args(hf, {"--kl-coef": "0.1"})
    catch("kl_without_ref", lambda: PolicyUpdater(kl_args, setup))
    setup.config.calculate_per_token_loss = True
    catch("per_token_loss", lambda: PolicyUpdater(args, setup))
    setup.config.calculate_per_token_loss = False
    updater = PolicyUpdater(args, setup)
    catch("batch_7", lambda: updater.update(make_samples(1)[:7], 1))
    mbs2 = PolicyUpdater(rl_args(hf, {"--micro-batch-size": "2"}), setup)
    catch("batch_6", lambda: mbs2.update(make_samples(1)[:6], 1))
    samples = make_samples(1)
    samples[3].rollout_logprobs = samples[3].rollout_logprobs[:-1]
    catch("logprob_len", lambda: updater.update(samples, 1))
    updater.update(make_samples(1), 1)
    catch("step_order", lambda: updater.update(make_samples(2), 1))
    grpo_bad = rl_args(hf, {"--algorithm": "grpo", "--sfpo-zscore-window": "1"})
    catch("window", lambda: PolicyUpdater(grpo_bad, setup))
    catch("sfpo_epochs", lambda: PolicyUpdater(rl_args(hf, {"--ppo-epochs": "2"}), setup))
    unclipped = {"--algorithm": "grpo", "--ppo-epochs": "2"}
    catch("unclipped", lambda: PolicyUpdater(rl_args(hf, unclipped, ("--no-ppo-clip",)), setup))
    # With the override the update runs: 2 passes x 2 mini-batches, no step clipped.
    allowed = PolicyUpdater(rl_args(hf, unclipped, ("--no-ppo-clip",
                                                    "--allow-unclipped-multi-step")), setup)
    before = hf_params(setup, hf)
    metrics = allowed.update(make_samples(1), 1)
    moved = max(float((t - before[n]).abs().max()) for n, t in hf_params(setup, hf).items())
    return {"errors": found, "unclipped_run": {"metrics": metrics, "passes": allowed.last_passes,
                                               "moved": moved}}


if __name__ == "__main__":
    run_worker(scenario)
