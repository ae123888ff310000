"""Evaluation: avg@k / pass@k on held-out prompt sets, inside the RL loop and as ``sfpo-megatron eval``.

Metrics per dataset ``NAME`` of ``--eval-prompt-data NAME=SPEC`` with k = ``--n-samples-per-eval-prompt``:

* ``eval/NAME/avg@k``: mean reward over all k samples of all prompts (the accuracy for 0/1 rewards);
* ``eval/NAME/pass@k``: fraction of prompts with at least one fully correct sample (reward >= 1);
* ``eval/NAME/response_length``: mean response tokens;
* ``eval/average`` (with two or more sets): the unweighted mean of the sets' avg@k, whatever their
  sizes — the SFPO paper's "average" column (its reference's ``val/test_score/average``).

A reward function with an ``eval_score_floor`` (``--reward-fn math-reference``: 0.95) has every
score below the floor counted as 0 here, before avg@k and pass@k: the reference's validation
("ignore the format score"), so a training-only format score never counts as accuracy.

``sfpo-megatron eval --model-config HF_DIR --load CKPT --eval-prompt-data NAME=SPEC ...`` loads a
torch_dist checkpoint (or ``--hf-checkpoint HF_DIR``) into megatron with the given TP/PP layout,
serves it through rollout servers exactly as the RL loop does, and prints the metrics as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist

from sfpo_megatron.components.checkpoint import CheckpointError, load_checkpoint
from sfpo_megatron.components.metrics import MetricsLogger
from sfpo_megatron.conversion.hf_mapping import load_hf_weights
from sfpo_megatron.data.prompts import dataset_kwargs, load_eval_datasets
from sfpo_megatron.data.rewards import RewardRunner, eval_score_floor, reward_fn_from_args
from sfpo_megatron.data.tokenizer import tokenizer_from_args
from sfpo_megatron.distributed import parallel
from sfpo_megatron.distributed.platform import setup_platform
from sfpo_megatron.distributed.rank0 import on_rank0
from sfpo_megatron.errors import UserError
from sfpo_megatron.models.hf_config import load_hf_config
from sfpo_megatron.rollout.engines import RolloutEngines, tokenizer_side_dirs
from sfpo_megatron.rollout.generate import (
    CORRECT,
    generate_groups,
    multi_turn_from_args,
    request_seed,
    sampling_params,
    tool_metrics,
)
from sfpo_megatron.trainer.model_setup import build_frozen_model

log = logging.getLogger("sfpo_megatron.eval")


def evaluate(client, datasets: dict[str, Any], tokenizer, rewards, *, n: int, params: dict, seed: int,
             step: int, expected_version: str | None, multi_turn=None) -> dict[str, float]:
    """avg@k / pass@k per dataset, and their average over the datasets (global rank 0 only);
    ``multi_turn``: with the tool (``--rollout-mode multi-turn``)."""
    metrics: dict[str, float] = {}
    floor = eval_score_floor(getattr(rewards, "fn", None))
    t0 = time.perf_counter()
    for name, ds in datasets.items():
        items = [ds[i] for i in range(len(ds))]
        groups, counts = generate_groups(client, items, tokenizer, rewards, n=n, params=params,
                                         seed=request_seed(seed, step, 0, f"eval:{name}"),
                                         expected_version=expected_version, multi_turn=multi_turn)
        scored = [[0.0 if floor is not None and r < floor else r for r in g.rewards] for g in groups]
        all_rewards = [r for g in scored for r in g]
        metrics[f"eval/{name}/avg@{n}"] = sum(all_rewards) / len(all_rewards)
        metrics[f"eval/{name}/pass@{n}"] = sum(any(r >= CORRECT for r in g) for g in scored) / len(scored)
        metrics[f"eval/{name}/response_length"] = (sum(len(x) for g in groups for x in g.response_ids)
                                                  / len(all_rewards))
        metrics[f"eval/{name}/reward_errors"] = float(counts.errors + counts.timeouts)
        metrics.update(tool_metrics([t for g in groups for t in g.tool_stats], f"eval/{name}/"))
        log.info("eval %s: avg@%d %.4f pass@%d %.4f (%d prompts)", name, n, metrics[f"eval/{name}/avg@{n}"],
                 n, metrics[f"eval/{name}/pass@{n}"], len(groups))
    if len(datasets) >= 2:
        metrics["eval/average"] = sum(metrics[f"eval/{name}/avg@{n}"] for name in datasets) / len(datasets)
        log.info("eval average of %d sets: avg@%d %.4f", len(datasets), n, metrics["eval/average"])
    metrics["time/eval_s"] = time.perf_counter() - t0
    return metrics


def eval_params(args: argparse.Namespace, tokenizer) -> dict[str, Any]:
    return sampling_params(args.eval_max_response_len or args.rollout_max_response_len, args.eval_temperature,
                           args.eval_top_p, args.rollout_top_k, [tokenizer.eos_id])


class EvalConfigError(UserError):
    """Flags ``sfpo-megatron eval`` cannot run with."""


def run_eval(args: argparse.Namespace, sglang_args: Sequence[str] = ()) -> dict[str, float]:
    """Load the policy, serve it, evaluate; returns the metrics (on every rank)."""
    if not args.eval_prompt_data:
        raise EvalConfigError("sfpo-megatron eval needs --eval-prompt-data NAME=SPEC [NAME=SPEC ...]")
    if bool(args.load) == bool(args.hf_checkpoint):
        raise EvalConfigError("sfpo-megatron eval needs exactly one of --load CKPT_DIR and --hf-checkpoint HF_DIR")
    reward_fn = reward_fn_from_args(args)  # a bad --reward-format-score stops here, before any work
    setup_platform()
    arch = load_hf_config(args.model_config)
    env = parallel.read_dist_env()
    parallel.check_layout(world_size=env.world_size, tp=args.tensor_model_parallel_size,
                          pp=args.pipeline_model_parallel_size, vpp=args.virtual_pipeline_model_parallel_size,
                          num_layers=arch.num_layers, num_attention_heads=arch.num_heads,
                          num_query_groups=arch.num_kv_heads, micro_batch_size=1, global_batch_size=None,
                          ep=args.expert_model_parallel_size, etp=args.expert_tensor_parallel_size,
                          num_experts=arch.num_experts)
    parallel.initialize(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                        vpp=args.virtual_pipeline_model_parallel_size, seed=args.seed,
                        timeout_minutes=args.distributed_timeout_minutes,
                        ep=args.expert_model_parallel_size, etp=args.expert_tensor_parallel_size)
    model = build_frozen_model(args, arch)
    iteration = 0
    if args.load:
        res = load_checkpoint(args.load, model, load_optim=False, load_rng=False)
        if res is None:
            raise CheckpointError(f"--load {args.load} holds no checkpoint")
        iteration = res.iteration
        version = int(res.extra_state.get("rl", {}).get("weight_version", iteration))
    else:
        load_hf_weights(model, arch, args.hf_checkpoint)
        version = 0
    tokenizer = tokenizer_from_args(args)
    rank0 = dist.get_rank() == 0
    # Only rank 0 writes the served export; a temporary one is removed at the end.
    tmpdir = tempfile.mkdtemp(prefix="sfpo_eval_") if rank0 and not args.save else None
    workdir = os.path.join(args.save, "rollout") if args.save else (tmpdir or "")
    engines = RolloutEngines(args, args.model_config, workdir, tokenizer_side_dirs(args, tokenizer), sglang_args)
    reward_runner = None
    try:
        engines.start(model, version)

        def work() -> dict[str, float]:
            nonlocal reward_runner
            reward_runner = RewardRunner(reward_fn, args.reward_num_workers, args.reward_timeout)
            datasets = load_eval_datasets(args.eval_prompt_data, tokenizer, **dataset_kwargs(args))
            return evaluate(engines.client, datasets, tokenizer, reward_runner,
                            n=args.n_samples_per_eval_prompt, params=eval_params(args, tokenizer),
                            seed=args.seed, step=iteration, expected_version=str(version),
                            multi_turn=multi_turn_from_args(args, engines.client, tokenizer))

        metrics = on_rank0(work)
    finally:
        if reward_runner is not None:
            reward_runner.close()
        if rank0:
            engines.close()
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    if rank0:
        with MetricsLogger(args.log_dir, args.tensorboard_dir, rank=0) as logger:
            logger.log(iteration, metrics)
        print(json.dumps({"iteration": iteration, "weight_version": version, **metrics}, sort_keys=True))
    return metrics
