"""torchrun worker for tests/test_moe_training.py: SFPO updates of a tiny Qwen3-MoE.

Runs the named scenarios one after the other (megatron's parallel state rebuilt for each layout)
and writes, from global rank 0, ``<out>/<scenario>.pt``: the parameters after the updates in HF
naming (gathered over the expert-parallel group by ``iter_hf_weights``) and per-step metrics.

    torchrun --nproc_per_node 2 moe_worker.py --hf DIR --out DIR --scenarios ep1,ep2
"""

from __future__ import annotations

from pathlib import Path

from sfpo_common import build_setup, make_samples, rl_args, run_worker

STEPS = 2
DIST_OPT = ("--use-distributed-optimizer",)
SCENARIOS = {  # scenario → (expert-parallel size, flags, setting overrides)
    "ep1": (1, DIST_OPT, {}),
    "ep2": (2, DIST_OPT, {}),
    "ep2_allgather": (2, DIST_OPT, {"--moe-token-dispatcher-type": "allgather"}),
    "ep1_noaux": (1, DIST_OPT, {"--moe-aux-loss-coeff": "0"}),
}


def scenario(name: str, hf: Path, out: Path) -> dict:
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file

    from sfpo_megatron.conversion.hf_mapping import iter_hf_weights
    from sfpo_megatron.distributed import parallel
    from sfpo_megatron.rollout.refit import export_hf
    from sfpo_megatron.update.policy_update import PolicyUpdater

    ep, flags, overrides = SCENARIOS[name]
    args = rl_args(hf, {**overrides, "--expert-model-parallel-size": str(ep)}, flags)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    parallel.initialize(tp=1, pp=1, ep=ep, seed=args.seed)
    setup, arch = build_setup(args, hf)
    updater = PolicyUpdater(args, setup)
    metrics = [updater.update(make_samples(step), step) for step in range(1, STEPS + 1)]
    params = {n: t.detach().float().cpu().clone() for n, t in iter_hf_weights(setup.model, str(hf))}
    # The refit's own path (each stage's leader and each expert-parallel rank its own experts),
    # written as the disk transport writes what a server loads.
    exported = export_hf(setup.model, str(hf), out / f"{name}_refit", 1)
    refit = None
    if exported is not None:
        refit = {}
        for f in sorted(exported.glob("*.safetensors")):
            refit.update({n: t.float() for n, t in load_file(f).items()})
    return {"metrics": metrics, "params": params, "refit": refit,
            "aux_coeff": setup.config.moe_aux_loss_coeff,
            "dispatcher": setup.config.moe_token_dispatcher_type}


if __name__ == "__main__":
    run_worker(scenario)
