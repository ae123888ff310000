"""torchrun / single-process worker for tests/test_trajectory_grad_norms.py.

Runs the named scenarios one after the other (megatron's parallel state rebuilt per layout) and
writes, from global rank 0, ``<out>/<scenario>.pt``: what every rank returned from the exact and
logit per-trajectory gradient norms (with its DP rank), and per-rank checks of the state the
exact mode leaves behind (grads zero, parameters / main params unchanged, config restored, and —
where asked — a following GRPO update bit-identical to one without the call).

    python grad_norm_worker.py --hf DIR --out DIR --scenarios dp1
    torchrun --nproc_per_node 2 grad_norm_worker.py --hf DIR --out DIR --scenarios dp2,tp2,pp2
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch
import torch.distributed as dist
from sfpo_common import LOGIT, STEP_CHECK, build_setup, make_samples, norm_batch, rl_args, run_worker
from sfpo_worker import hf_params

LAYOUTS = {  # scenario → (tp, pp, vpp, extra flags, model dir suffix)
    "dp1": (1, 1, None, (), ""),
    "dp2": (1, 1, None, ("--use-distributed-optimizer",), ""),
    "dp2_overlap": (1, 1, None, ("--use-distributed-optimizer", "--overlap-grad-reduce",
                                 "--overlap-param-gather"), ""),
    "tp2": (2, 1, None, (), ""),
    "tp2_qwen3": (2, 1, None, (), "_qwen3"),
    "pp2": (1, 2, None, (), ""),
    "vpp2": (1, 2, 2, (), "_4layers"),
}


def reinit(tp: int, pp: int, seed: int, vpp: int | None) -> None:
    from megatron.core import parallel_state as ps

    from sfpo_megatron.distributed import parallel

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    parallel.initialize(tp=tp, pp=pp, vpp=vpp, seed=seed)


def local_rows(batch):
    from megatron.core import parallel_state as ps

    return batch.split(ps.get_data_parallel_world_size())[ps.get_data_parallel_rank()]


def gather(obj):
    """obj of every global rank, in rank order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def state_snapshot(setup) -> list[torch.Tensor]:
    from sfpo_megatron.trainer.main_params import inner_optimizers, main_params

    model = [p.detach().clone() for c in setup.model for p in c.parameters()]
    main = [p.detach().clone() for opt in inner_optimizers(setup.optimizer)
            for p in main_params(opt)]
    return model + main


def grpo_update(hf: Path, args_over: dict, flags: tuple, setup=None):
    from sfpo_megatron.update.policy_update import PolicyUpdater

    args = rl_args(hf, {**args_over, "--algorithm": "grpo"}, flags)
    if setup is None:
        setup, _ = build_setup(args, hf)
    PolicyUpdater(args, setup).update(make_samples(1), 1)
    return hf_params(setup, hf)


def scenario(name: str, hf_root: Path) -> dict:
    from megatron.core import parallel_state as ps

    from sfpo_megatron.trainer.model_setup import unwrap
    from sfpo_megatron.trainer.trajectory_grad_norms import logit_grad_sq_norms, trajectory_grad_sq_norms

    tp, pp, vpp, flags, suffix = LAYOUTS[name]
    hf = Path(str(hf_root) + suffix)
    over = {"--tensor-model-parallel-size": str(tp), "--pipeline-model-parallel-size": str(pp)}
    if vpp:
        over["--virtual-pipeline-model-parallel-size"] = str(vpp)
    args = rl_args(hf, over, flags)
    reinit(tp, pp, args.seed, vpp)
    setup, arch = build_setup(args, hf)
    batch = local_rows(norm_batch())
    temp = float(args.rollout_temperature)
    dp_rank = ps.get_data_parallel_rank()

    finalize, no_sync = setup.config.finalize_model_grads_func, setup.config.no_sync_func
    before = state_snapshot(setup)
    t0 = time.perf_counter()
    exact = trajectory_grad_sq_norms(setup, batch, temperature=temp, vocab_size=arch.vocab_size)
    t_exact = time.perf_counter() - t0
    after = state_snapshot(setup)
    checks = {
        "dtype": str(exact.dtype), "device": str(exact.device), "shape": tuple(exact.shape),
        "grads_zero": all(bool((p.main_grad == 0).all()) for c in setup.model
                          for p in c.parameters() if p.requires_grad),
        "params_unchanged": len(before) == len(after) and all(
            torch.equal(a, b) for a, b in zip(before, after)),
        "config_restored": setup.config.finalize_model_grads_func is finalize
        and setup.config.no_sync_func is no_sync,
        "exact_s": t_exact,
        # Global layer numbers of this rank's model chunks: the pipeline (and interleaved) split.
        "chunk_layers": [[layer.layer_number for layer in unwrap(c).decoder.layers] for c in setup.model],
    }
    result: dict = {"exact": gather((dp_rank, exact)), "checks": gather(checks)}
    if name in LOGIT:
        logit = logit_grad_sq_norms(setup.model, batch, micro_batch_size=2, temperature=temp,
                                    vocab_size=arch.vocab_size)
        result["logit"] = gather((dp_rank, logit))
    if name in STEP_CHECK:
        # The call leaves nothing behind: the same GRPO update after it and on a fresh setup.
        with_call = grpo_update(hf, over, flags, setup)
        del setup
        gc.collect()
        fresh = grpo_update(hf, over, flags)
        result["step_after_call_equal"] = sorted(with_call) == sorted(fresh) and all(
            torch.equal(with_call[k], fresh[k]) for k in with_call)
    return result


if __name__ == "__main__":
    run_worker(lambda name, hf, out: scenario(name, hf))
