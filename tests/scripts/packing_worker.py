"""torchrun / single-process worker for tests/test_packing_update.py: the same SFPO update with
padded micro-batches and with packed token-budget micro-batches (--use-dynamic-batch-size).

Each scenario ``<mode>_<layout>`` (mode ``padded`` or ``packed``; layout ``dp1``, ``dp2`` (with
the distributed optimizer), ``tp2``, ``pp2``, ``opob`` (DP=1, VCPO with the OPOB baseline), ``cp2`` / ``cp2opob`` (context
parallelism over 2 ranks), ``cp2tp2`` / ``cp2dp2`` (4 ranks)) writes, from global rank 0, ``<out>/<scenario>.pt``:
the old log-probs and entropies of the whole step-1 batch at θ0, the per-step metrics, every
pass's per-mini-batch statistics and the final parameters (HF names, full tensors).

    python packing_worker.py --hf DIR --out DIR --scenarios padded_dp1,packed_dp1
    torchrun --nproc_per_node 2 packing_worker.py --hf DIR --out DIR --scenarios padded_dp2,...
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from sfpo_common import build_setup, rl_args, run_worker
from sfpo_worker import hf_params, reinit, to_rank0

STEPS = 2
BUDGET = 100  # tokens per packed micro-batch; the longest sample has 16 + 80 = 96
LAYOUTS = {  # layout → (tp, pp, extra flags)
    "dp1": (1, 1, ()),
    "dp2": (1, 1, ("--use-distributed-optimizer",)),
    "tp2": (2, 1, ()),
    "pp2": (1, 2, ()),
    # VCPO with OPOB: the "logit" gradient norms come out of the (packed) old-log-prob forward.
    "opob": (1, 1, ("--vcpo", "--off-policy-baseline", "opob")),
    # Context parallelism: each packed sequence split over 2 ranks (megatron's chunks).
    "cp2": (1, 1, ("--context-parallel-size", "2")),
    "cp2opob": (1, 1, ("--context-parallel-size", "2", "--vcpo", "--off-policy-baseline", "opob")),
    "cp2tp2": (2, 1, ("--context-parallel-size", "2")),  # 4 processes
    "cp2dp2": (1, 1, ("--context-parallel-size", "2", "--use-distributed-optimizer")),  # 4 processes
}
SETTINGS = {"--micro-batch-size": "2", "--num-steps-per-rollout": "2",
            "--rollout-max-response-len": "80"}


def long_tailed_samples(step: int, n_prompts: int = 4, n: int = 4, vocab: int = 256) -> list:
    """Prompts of 2-16 tokens, responses log-normal (median 6 tokens, a tail to 80): most of a
    padded batch is padding."""
    from sfpo_megatron.algorithms.advantages import group_normalized_advantages
    from sfpo_megatron.records import Sample

    rng = random.Random(7000 + step)
    samples = []
    for g in range(n_prompts):
        prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(2, 16))]
        for _ in range(n):
            r = min(80, max(1, round(math.exp(rng.gauss(math.log(6), 1.0)))))
            samples.append(Sample(
                prompt_index=g, group_id=100 * step + g, prompt_ids=list(prompt),
                response_ids=[rng.randrange(2, vocab) for _ in range(r)],
                rollout_logprobs=[-rng.uniform(0.5, 6.0) for _ in range(r)],
                weight_version=step - 1, reward=float(rng.random() < 0.5)))
    samples[0].reward, samples[1].reward = 1.0, 0.0  # at least one mixed group
    samples[-1].response_ids = samples[-1].response_ids[:1] + [5] * 79  # one 80-token response
    samples[-1].rollout_logprobs = [-1.0] * 80
    adv = group_normalized_advantages([s.reward for s in samples], [s.group_id for s in samples])
    for s, a in zip(samples, adv.tolist()):
        s.advantage = a
    return samples


def theta0_logprobs(setup, args, arch, packed: bool):
    """Old log-probs and entropies of the whole step-1 batch (every DP rank runs all of it)."""
    from megatron.core import parallel_state as ps

    from sfpo_megatron.trainer.packing import first_fit_decreasing, pack_spec, row_lengths
    from sfpo_megatron.trainer.policy_forward import compute_logprobs
    from sfpo_megatron.trainer.train_batch import collate

    batch = collate(long_tailed_samples(1), 0)
    kw = {}
    if packed:
        spec = pack_spec(BUDGET, 0, ps.get_tensor_model_parallel_world_size(),
                         ps.get_pipeline_model_parallel_world_size(),
                         ps.get_context_parallel_world_size())
        lengths = [spec.segment_length(n) for n in row_lengths(batch)]
        kw = dict(packing=first_fit_decreasing(lengths, BUDGET), pack=spec)
    res = compute_logprobs(setup.model, batch, micro_batch_size=args.micro_batch_size,
                           temperature=args.rollout_temperature, vocab_size=arch.vocab_size, **kw)
    if res is None or ps.get_tensor_model_parallel_rank() or ps.get_data_parallel_rank() \
            or ps.get_context_parallel_rank():
        return None
    return {"logprobs": res.logprobs.cpu(), "entropy": res.entropy.cpu(),
            "loss_mask": batch.loss_mask}


def scenario(name: str, hf: Path, out: Path) -> dict:
    from sfpo_megatron.update.policy_update import PolicyUpdater

    mode, layout = name.split("_")
    tp, pp, flags = LAYOUTS[layout]
    overrides = {**SETTINGS, "--tensor-model-parallel-size": str(tp),
                 "--pipeline-model-parallel-size": str(pp)}
    if mode == "packed":
        overrides["--max-tokens-per-gpu"] = str(BUDGET)
        flags = (*flags, "--use-dynamic-batch-size")
    args = rl_args(hf, overrides, flags)
    reinit(tp, pp, args.seed, args.context_parallel_size)
    setup, arch = build_setup(args, hf)
    result = {"theta0": to_rank0(theta0_logprobs(setup, args, arch, mode == "packed")),
              "metrics": [], "passes": []}
    result["init"] = hf_params(setup, hf)
    updater = PolicyUpdater(args, setup, pad_id=0)
    for step in range(1, STEPS + 1):
        result["metrics"].append(updater.update(long_tailed_samples(step), step))
        result["passes"].append(updater.last_passes)
    result["params"] = hf_params(setup, hf)
    return result


if __name__ == "__main__":
    run_worker(scenario)
