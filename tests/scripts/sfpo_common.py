"""Shared by the SFPO / VCPO / gradient-norm tests and their torchrun workers: the deterministic
rollout batches, the settings both the megatron run and the plain-PyTorch reference use, and the
scenario choices each test reads back. The tests load this file with ``launch.load_module``; the
workers, beside it, import it.

The model both sides run is tiny_models.save_sfpo_model's (built by the tests): a tiny Llama with
tied embeddings and a vocabulary of 256 ids.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

VOCAB = 256  # tiny_models.TRAINER_VOCAB, the vocabulary of the tests' model

# One set of RL settings for the equivalence runs (flag → value).
BATCH = 8  # samples per rollout batch: 2 prompts x 4 responses
SETTINGS = {
    "--lr": "1e-3", "--min-lr": "0", "--lr-decay-style": "linear", "--weight-decay": "0.01",
    "--clip-grad": "1.0", "--num-rollouts": "4", "--num-steps-per-rollout": "2",
    "--micro-batch-size": "1", "--sfpo-inner-steps": "2", "--sfpo-alpha": "0.8",
    "--eps-clip": "0.2", "--entropy-coef": "0.01", "--rollout-temperature": "0.8",
    "--rollout-max-response-len": "10", "--seed": "3",
    # Adam's first steps are ~lr * g / (|g| + eps): with eps 1e-8 a gradient element within
    # rounding noise of zero (the two sides sum in different orders) becomes a step difference of
    # a sizeable fraction of lr, and which element depends on the CPU's kernels. 1e-6 keeps the
    # comparison about the algorithm.
    "--adam-eps": "1e-6",
}


def make_samples(step: int, n_prompts: int = 2, n: int = 4, seed: int = 0,
                 max_prompt: int = 6, max_response: int = 10, vocab: int = VOCAB) -> list:
    """A deterministic rollout batch: varied prompt/response lengths, rewards with one
    all-equal group (zero advantages) and one mixed group."""
    from sfpo_megatron.algorithms.advantages import group_normalized_advantages
    from sfpo_megatron.records import Sample

    rng = random.Random(1000 * seed + step)
    samples = []
    for g in range(n_prompts):
        prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(2, max_prompt))]
        for _ in range(n):
            r = rng.randint(1, max_response)
            samples.append(Sample(
                prompt_index=g, group_id=100 * step + g, prompt_ids=list(prompt),
                response_ids=[rng.randrange(2, vocab) for _ in range(r)],
                rollout_logprobs=[-rng.uniform(0.5, 6.0) for _ in range(r)],
                weight_version=step - 1, reward=float(rng.random() < 0.5)))
    if n_prompts > 1:  # the last group: all rewards equal
        for s in samples[-n:]:
            s.reward = 1.0
    samples[0].reward, samples[1].reward = 1.0, 0.0  # the first group is mixed
    adv = group_normalized_advantages([s.reward for s in samples], [s.group_id for s in samples])
    for s, a in zip(samples, adv.tolist()):
        s.advantage = a
    return samples


# ---- trajectory gradient norms (grad_norm_worker.py, test_trajectory_grad_norms.py) ----------
# Scenarios that also check a following GRPO update against one on a fresh setup.
STEP_CHECK = {"dp1", "dp2_overlap"}
# Scenarios that also compute the logit-mode norms.
LOGIT = {"dp1", "tp2", "pp2"}


def norm_batch():
    """make_samples(1) (2 groups x 4 rows, varied lengths) with row 6's response emptied."""
    from sfpo_megatron.trainer.train_batch import collate

    samples = make_samples(1)
    samples[6].response_ids, samples[6].rollout_logprobs = [], []
    return collate(samples, 0)


# ---- VCPO (vcpo_worker.py, test_vcpo_update.py) ---------------------------------------------
RHO_BASE = 0.9
DELTAS = [0.0, -1.0, 0.5, -2.0, 1.5, 0.0, -0.5, 2.5]  # log w_i of the 8 samples


def closed_form(deltas: list[float]) -> dict[str, float]:
    """ESS = (Σw)²/Σw², ρ = ESS/B and the LR scale sqrt(min(1, ρ/ρ_base)) for log-weights δ."""
    w = [math.exp(d) for d in deltas]
    ess = sum(w) ** 2 / sum(x * x for x in w)
    rho = ess / len(w)
    return {"ess": ess, "rho": rho, "scale": math.sqrt(min(1.0, rho / RHO_BASE))}


def rl_args(model_dir: Path, overrides: dict | None = None, flags: tuple = ()):
    from sfpo_megatron.arguments import build_rl_parser

    settings = {**SETTINGS, **(overrides or {})}
    argv = ["--model-config", str(model_dir)]
    for k, v in settings.items():
        argv.append(f"{k}={v}")
    return build_rl_parser().parse_args(argv + list(flags))


def build_setup(args, model_dir: Path):
    """megatron training setup with the HF weights loaded (and copied into the main params)."""
    from sfpo_megatron.conversion.hf_mapping import load_hf_weights
    from sfpo_megatron.models.hf_config import load_hf_config
    from sfpo_megatron.trainer.model_setup import build_training_setup

    arch = load_hf_config(str(model_dir))
    setup = build_training_setup(args, arch, total_scheduler_steps=args.num_rollouts)
    load_hf_weights(setup.model, str(model_dir), str(model_dir))
    setup.optimizer.reload_model_params()
    return setup, arch


def run_worker(scenario) -> None:
    """The workers' command line: ``--hf DIR --out DIR --scenarios a,b,...``; runs
    ``scenario(name, hf, out)`` for each name in this process group and saves its result from
    global rank 0 as ``<out>/<name>.pt``."""
    import argparse
    import gc
    import time
    import traceback

    import torch.distributed as dist

    p = argparse.ArgumentParser()
    p.add_argument("--hf", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--scenarios", required=True)
    a = p.parse_args()
    from sfpo_megatron.distributed import parallel
    from sfpo_megatron.distributed.platform import setup_platform

    setup_platform()
    for name in a.scenarios.split(","):
        t0 = time.perf_counter()
        try:
            result = scenario(name, a.hf, a.out)
        except Exception:
            traceback.print_exc()
            raise
        if not dist.is_initialized() or dist.get_rank() == 0:
            torch.save(result, a.out / f"{name}.pt")
            print(f"scenario {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        gc.collect()
    parallel.destroy()
