"""torchrun / single-process worker for tests/test_memory_plan.py: the bytes each rank really holds.

Builds the rl training setup from rl's parser (``--flags`` after ``--``), runs one SFPO update on
a deterministic batch (so Adam's state and θ0's snapshot exist) and counts the live tensors:

* weights: DDP's param buffers (distributed optimizer) or the model parameters;
* grad_buffers: DDP's main-grad buffers;
* main_params: fp32 tensors the optimizer updates whose storage is not a model parameter's;
* adam_moments: every tensor in the inner optimizer's state (exp_avg, exp_avg_sq);
* sfpo_snapshot: the copies in the updater's θ0 snapshot, recorded by a stage hook.

Each rank's counts (with its pp / tp / dp rank) are gathered and written by global rank 0 as
``<out>/<name>.json``.

    torchrun --nproc_per_node 2 plan_worker.py --hf DIR --out DIR --scenarios '{"dp2": [...]}'


``--activations T,...`` instead measures the peak of live CPU bytes during one micro-batch's
forward and backward of the update (torch.profiler with profile_memory: its allocation records, summed in time
order), after a first update has created the optimizer state; for each T a
rollout batch whose samples are T tokens long (one sample per packed micro-batch).
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch
import torch.distributed as dist
from sfpo_common import make_samples

from sfpo_megatron.arguments import build_rl_parser
from sfpo_megatron.distributed import parallel
from sfpo_megatron.distributed.platform import gpu_available, setup_platform
from sfpo_megatron.models.hf_config import load_hf_config
from sfpo_megatron.records import Sample
from sfpo_megatron.trainer.main_params import inner_optimizers
from sfpo_megatron.trainer.model_setup import build_training_setup
from sfpo_megatron.update.policy_update import PolicyUpdater


def reset_model_parallel() -> None:
    """Drop megatron's groups (the process group stays) so the next scenario picks its layout."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    gc.collect()


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def count_bytes(setup, snapshot_bytes: int) -> dict:
    from megatron.core import parallel_state as ps

    weights = grads = 0
    model_storages = set()
    for chunk in setup.model:
        buffers = list(chunk.buffers) + list(chunk.expert_parallel_buffers)
        for buf in buffers:
            grads += nbytes(buf.grad_data)
            if buf.param_data is not None:
                weights += nbytes(buf.param_data)
                model_storages.add(buf.param_data.untyped_storage().data_ptr())
        if not any(buf.param_data is not None for buf in buffers):
            weights += sum(nbytes(p) for p in chunk.parameters())
        model_storages |= {p.untyped_storage().data_ptr() for p in chunk.parameters()}
    main = adam = 0
    for opt in inner_optimizers(setup.optimizer):
        base = opt.optimizer
        for group in base.param_groups:
            for p in group["params"]:
                if p.untyped_storage().data_ptr() not in model_storages:
                    main += nbytes(p)
                adam += sum(nbytes(v) for v in base.state.get(p, {}).values()
                            if isinstance(v, torch.Tensor))
    return {"pp_rank": ps.get_pipeline_model_parallel_rank(),
            "tp_rank": ps.get_tensor_model_parallel_rank(),
            "dp_rank": ps.get_data_parallel_rank(), "weights": weights, "grad_buffers": grads,
            "main_params": main, "adam_moments": adam, "sfpo_snapshot": snapshot_bytes}


def build(flags: list[str], hf: Path):
    args = build_rl_parser().parse_args(["--model-config", str(hf), *flags])
    parallel.initialize(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                        vpp=args.virtual_pipeline_model_parallel_size, seed=args.seed,
                        ep=args.expert_model_parallel_size, etp=args.expert_tensor_parallel_size)
    args.global_batch_size = args.rollout_batch_size * args.n_samples_per_prompt
    arch = load_hf_config(str(hf))
    return args, build_training_setup(args, arch, total_scheduler_steps=2)


def live_bytes(out: Path, name: str, hf: Path, flags: list[str]) -> None:
    args, setup = build(flags, hf)
    updater = PolicyUpdater(args, setup)
    recorded = {}

    def hook(stage: str, upd) -> None:
        if stage == "theta0":
            recorded["snapshot"] = sum(nbytes(c) for _, _, cs in upd.snapshot.groups for c in cs)

    updater.stage_hook = hook
    updater.update(make_samples(1, vocab=min(256, setup.arch.vocab_size)), 1)
    counts = count_bytes(setup, recorded.get("snapshot", 0))
    gathered = [None] * dist.get_world_size() if dist.is_initialized() else [counts]
    if dist.is_initialized():
        dist.all_gather_object(gathered, counts)
    if not dist.is_initialized() or dist.get_rank() == 0:
        (out / f"{name}.json").write_text(json.dumps(gathered))


def long_samples(tokens: int, n: int, step: int) -> list:
    """n samples of exactly ``tokens`` tokens (prompt 8), advantages ±1."""
    g = torch.Generator().manual_seed(step)
    samples = []
    for i in range(n):
        ids = torch.randint(2, 256, (tokens,), generator=g).tolist()
        samples.append(Sample(prompt_index=i // 2, group_id=100 * step + i // 2,
                              prompt_ids=ids[:8], response_ids=ids[8:],
                              rollout_logprobs=[-1.0] * (tokens - 8), weight_version=step - 1,
                              reward=float(i % 2), advantage=1.0 if i % 2 else -1.0))
    return samples


def peak_of_update(updater, samples, step: int) -> int:
    """Peak of live bytes above the start during the update: on the CPU the profiler's
    allocation records (``[memory]`` events, + bytes allocated / - bytes freed) summed in time
    order; on a GPU ``torch.cuda.max_memory_allocated``."""
    from torch.profiler import ProfilerActivity, profile

    if gpu_available():  # on a GPU: the caching allocator's own peak
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        updater.update(samples, step)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        updater.update(samples, step)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def activations(out: Path, name: str, hf: Path, flags: list[str], lengths: list[int]) -> None:
    result = {}
    for t in lengths:
        # One sample = one packed micro-batch of exactly t tokens; one optimizer step.
        args, setup = build([*flags, "--use-dynamic-batch-size", f"--max-tokens-per-gpu={t}"], hf)
        updater = PolicyUpdater(args, setup)
        n = args.rollout_batch_size * args.n_samples_per_prompt
        updater.update(long_samples(t, n, 1), 1)  # creates Adam's state
        result[str(t)] = peak_of_update(updater, long_samples(t, n, 2), 2)
        del updater, setup
        reset_model_parallel()
    (out / f"{name}.json").write_text(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hf", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--scenarios", required=True, help="JSON: name -> rl flags")
    p.add_argument("--activations", default=None, help="comma-separated token counts")
    a = p.parse_args()
    setup_platform()
    for name, flags in json.loads(a.scenarios).items():
        if a.activations:
            activations(a.out, name, a.hf, flags, [int(x) for x in a.activations.split(",")])
        else:
            live_bytes(a.out, name, a.hf, flags)
        reset_model_parallel()
    parallel.destroy()


if __name__ == "__main__":
    main()
