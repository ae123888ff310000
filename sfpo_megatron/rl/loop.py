"""``sfpo-megatron rl``: the RL loop on the megatron trainer (synchronous, or asynchronous
rollouts with ``--async-rollout``).

One RL step (``--num-rollouts`` of them)::

    prompts (PromptSampler, resumable)  ──►  rollout: n samples per prompt from the rollout
    servers at the current weight_version (checked per response), per-request seeds derived from
    (seed, step, round, prompt, sample)  ──►  rewards (RewardRunner: parallel, timeouts → 0)
    ──►  [--dynamic-sampling: drop groups whose rewards all agree, refill from the sampler]
    ──►  group advantages  ──►  PolicyUpdater.update (SFPO / GRPO)  ──►  refit (weight_version+1)
    ──►  evaluation every --eval-interval  ──►  metrics.jsonl + TensorBoard  ──►  checkpoint
    every --save-interval

Only global rank 0 talks HTTP and runs the reward workers; the rollout batch reaches every
trainer rank through ``broadcast_object_list`` (trainer ranks only). Anything rank 0 fails at is
re-raised on every rank (``rollout.refit.on_rank0``), so no rank hangs in a collective.

Policy initialisation, in order: the newest checkpoint in ``--save`` (a restarted run continues:
model, optimizer, scheduler, RNG, sampler position, SFPO controller, weight version, step);
``--load`` (a torch_dist checkpoint: an RL checkpoint resumes unless ``--finetune``, any other,
e.g. one converted from HF, gives the weights only); ``--hf-checkpoint`` (HF safetensors).

Checkpoints are written atomically (components/checkpoint.py), so a run killed at any moment,
SIGKILL included, restarts with the same command from the last complete checkpoint. With
``--rollout-deterministic`` every rollout is a function of (weights, prompt, seed) and the
restarted run's metrics equal an uninterrupted run's bit for bit (CPU, fixed thread counts).
SIGTERM / SIGUSR1 checkpoint at the end of the current step and exit with 143.

``--async-rollout --max-staleness k``: rank 0's ``AsyncRolloutProducer`` (rl/async_rollout.py)
generates batch s as soon as the servers hold version ≥ s − 1 − k, in a thread, while the
trainer trains earlier batches; each sample keeps the version it was generated with, the step
checks the bound, logs the staleness histogram and ``rollout_batches.jsonl``, and the update
computes importance weights / ESS (rl/off_policy.py; corrected with ``--vcpo``). Checkpoints
carry the finished, untrained batches: a restart (async or not) trains every prompt once.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

log = logging.getLogger("sfpo_megatron.rl")

STATE_KEY = "rl"  # extra_state key of RL checkpoints
BATCH_LOG = "rollout_batches.jsonl"
_STATE_VERSION = 1


class RLConfigError(ValueError):
    """RL flags that cannot work together, named with their values."""


class Preempted(Exception):
    """SIGTERM / SIGUSR1 arrived: checkpointed at ``step``; exit with 143."""

    def __init__(self, step: int) -> None:
        super().__init__(f"preempted after step {step}")
        self.step = step


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input or a broken setup: one line, exit code 2, no traceback."""
    from sfpo_megatron.components.checkpoint import CheckpointError
    from sfpo_megatron.conversion.hf_mapping import MappingError
    from sfpo_megatron.data.prompts import DatasetError
    from sfpo_megatron.data.rewards import RewardFunctionError
    from sfpo_megatron.data.tokenizer import TokenizerError
    from sfpo_megatron.distributed.parallel import LayoutError
    from sfpo_megatron.models.hf_config import ParallelLayoutError, UnsupportedModelError
    from sfpo_megatron.rl.sfpo import PolicyUpdateError
    from sfpo_megatron.rl.vcpo import VCPOError
    from sfpo_megatron.rl.train_batch import TrainBatchError
    from sfpo_megatron.rollout.client import NoLiveServerError
    from sfpo_megatron.rollout.refit import RankZeroError, RolloutConfigError
    from sfpo_megatron.rollout.sglang_launcher import LaunchError
    from sfpo_megatron.rollout.transport import RefitError

    return (RLConfigError, CheckpointError, MappingError, DatasetError, RewardFunctionError, TokenizerError,
            LayoutError, ParallelLayoutError, UnsupportedModelError, PolicyUpdateError, TrainBatchError,
            NoLiveServerError, LaunchError, RefitError, RankZeroError, RolloutConfigError, VCPOError)


# ------------------------------------------------------------------------------------------------
# Arguments, tokenizer
# ------------------------------------------------------------------------------------------------


def check_rl_args(args: argparse.Namespace) -> None:
    for name in ("rollout_batch_size", "n_samples_per_prompt", "rollout_max_response_len",
                 "n_samples_per_eval_prompt", "num_steps_per_rollout"):
        if getattr(args, name) < 1:
            raise RLConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    batch = args.rollout_batch_size * args.n_samples_per_prompt
    if batch % args.num_steps_per_rollout:
        raise RLConfigError(f"rollout batch of {batch} samples (--rollout-batch-size {args.rollout_batch_size} x "
                            f"--n-samples-per-prompt {args.n_samples_per_prompt}) is not divisible by "
                            f"--num-steps-per-rollout {args.num_steps_per_rollout}")
    if args.num_rollouts < 0:
        raise RLConfigError(f"--num-rollouts must be >= 0, got {args.num_rollouts}")
    if not args.prompt_data:
        raise RLConfigError("sfpo-megatron rl needs --prompt-data (JSONL / Parquet file or rg:TASK?size=N&seed=S)")
    if args.max_staleness < 0:
        raise RLConfigError(f"--max-staleness must be >= 0, got {args.max_staleness}")
    if args.async_rollout and args.colocate:
        raise RLConfigError("--async-rollout overlaps generation with training, --colocate time-shares "
                            "the devices between them: use one of the two")
    if args.off_policy_baseline == "opob" and not args.vcpo:
        raise RLConfigError("--off-policy-baseline opob is part of VCPO: add --vcpo")
    if args.dynamic_sampling and args.n_samples_per_prompt < 2:
        raise RLConfigError(f"--dynamic-sampling drops groups whose rewards all agree; with "
                            f"--n-samples-per-prompt {args.n_samples_per_prompt} every group agrees")
    if args.max_resample_rounds < 0:
        raise RLConfigError(f"--max-resample-rounds must be >= 0, got {args.max_resample_rounds}")
    for name in ("eval_interval", "save_interval"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise RLConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.eval_interval and not args.eval_prompt_data:
        raise RLConfigError(f"--eval-interval {args.eval_interval} needs --eval-prompt-data NAME=SPEC ...")
    if args.save_interval and not args.save:
        raise RLConfigError(f"--save-interval {args.save_interval} needs --save DIR")
    if args.load and args.hf_checkpoint:
        raise RLConfigError(f"give one policy initialisation: --load {args.load} or --hf-checkpoint "
                            f"{args.hf_checkpoint}, not both")
    if not args.rollout_temperature > 0:
        raise RLConfigError(f"--rollout-temperature must be > 0 (the trainer's logprobs use it), "
                            f"got {args.rollout_temperature}")


def load_rl_tokenizer(args: argparse.Namespace):
    from sfpo_megatron.data.tokenizer import load_tokenizer

    return load_tokenizer(args.tokenizer_path or args.model_config)


def tokenizer_side_dirs(args: argparse.Namespace, tokenizer) -> list[str]:
    """Directories whose HF tokenizer files go next to the exported weights (a SentencePiece
    model stays with the trainer: servers get token ids and the trainer decodes)."""
    from sfpo_megatron.data.tokenizer import HFTokenizer

    if not isinstance(tokenizer, HFTokenizer):
        return []
    path = args.tokenizer_path or args.model_config
    return [path if os.path.isdir(path) else os.path.dirname(path)]


# ------------------------------------------------------------------------------------------------
# Rollout (global rank 0)
# ------------------------------------------------------------------------------------------------


@dataclass
class RolloutResult:
    samples: list  # rl.batch.Sample, the training batch (groups contiguous)
    metrics: dict[str, float] = field(default_factory=dict)
    step: int = 0  # the RL step it was generated for
    sampler_start: dict | None = None  # sampler state before its prompts were drawn (async resume)


def to_train_samples(groups: Sequence[Any], step: int, version: int | None) -> list:
    """Scored groups → ``rl.batch.Sample`` with group-normalised advantages filled in later.
    ``version``: the one weight version of a synchronous rollout; None takes each response's own."""
    from sfpo_megatron.rl.batch import Sample

    out = []
    for g_index, g in enumerate(groups):
        versions = [version] * len(g.texts) if version is not None else [int(v) for v in g.weight_versions]
        for ids, lps, reason, text, reward, v in zip(g.response_ids, g.logprobs, g.finish_reasons, g.texts,
                                                      g.rewards, versions):
            out.append(Sample(prompt_index=g.item.index, group_id=step * 1_000_000 + g_index,
                              prompt_ids=list(g.item.prompt_ids), response_ids=list(ids),
                              rollout_logprobs=list(lps), weight_version=v, finish_reason=reason,
                              response_text=text, answer=g.item.answer, reward=float(reward)))
    return out


class RolloutWorker:
    """Rank 0's side of a step: sample prompts, generate, score, dynamic sampling, advantages."""

    def __init__(self, args: argparse.Namespace, client, tokenizer, dataset, sampler, rewards) -> None:
        from sfpo_megatron.rl.evaluate import sampling_params

        self.args = args
        self.client = client
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.sampler = sampler
        self.rewards = rewards
        self.params = sampling_params(args.rollout_max_response_len, args.rollout_temperature,
                                      args.rollout_top_p, args.rollout_top_k, [tokenizer.eos_id])

    def collect(self, step: int, version: int | None) -> RolloutResult:
        """Batch ``step``; ``version`` is checked on every response (synchronous), or None
        (asynchronous: each sample keeps the version it was generated with)."""
        from sfpo_megatron.rl.advantages import group_normalized_advantages
        from sfpo_megatron.rl.evaluate import generate_groups, group_metrics, request_seed

        a = self.args
        need = a.rollout_batch_size
        t0 = time.perf_counter()
        kept, dropped, generated = [], [], []
        errors = timeouts = rounds = 0
        while len(kept) < need and rounds <= (a.max_resample_rounds if a.dynamic_sampling else 0):
            items = self.sampler.next_batch(need - len(kept))
            groups, counts = generate_groups(
                self.client, items, self.tokenizer, self.rewards, n=a.n_samples_per_prompt, params=self.params,
                seed=request_seed(a.seed, step, rounds, "rollout"),
                expected_version=None if version is None else str(version))
            errors, timeouts = errors + counts.errors, timeouts + counts.timeouts
            generated += groups
            for g in groups:
                (dropped if a.dynamic_sampling and g.all_equal else kept).append(g)
            rounds += 1
        # Still short after the last refill round: fill up with dropped groups (zero advantage),
        # so the batch keeps the size the mini-batch / DP / micro-batch layout was checked for.
        padded = max(0, need - len(kept))
        batch = kept[:need] + dropped[:padded]
        samples = to_train_samples(batch, step, version)
        adv = group_normalized_advantages([s.reward for s in samples], [s.group_id for s in samples],
                                          eps=a.advantage_eps, std_normalize=not a.disable_std_normalization)
        for s, value in zip(samples, adv.tolist()):
            s.advantage = float(value)
        metrics = group_metrics(generated, "rollout/")
        metrics.update({k: v for k, v in group_metrics(batch, "train_batch/").items()
                        if k.endswith(("reward_mean", "accuracy"))})
        metrics.update({
            "rollout/reward_errors": float(errors), "rollout/reward_timeouts": float(timeouts),
            "rollout/num_samples": float(sum(len(g.texts) for g in generated)),
            "rollout/weight_version": sum(s.weight_version for s in samples) / len(samples),
            "rollout/advantage_abs_mean": sum(abs(s.advantage) for s in samples) / len(samples),
            "train_batch/uniform_groups": float(sum(g.all_equal for g in batch)),
            "data/skipped_malformed_rows": float(self.dataset.num_skipped),
            "data/epoch": float(self.sampler.epoch),
            "time/rollout_s": time.perf_counter() - t0,
        })
        if a.dynamic_sampling:
            metrics.update({"rollout/dynamic_rounds": float(rounds),
                            "rollout/dynamic_dropped_groups": float(len(dropped)),
                            "rollout/dynamic_padded_groups": float(padded)})
        return RolloutResult(samples, metrics)


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


@dataclass
class RunState:
    step: int = 0  # completed RL steps
    weight_version: int = 0  # the servers' weights; = step after a fresh start
    sampler: dict | None = None
    updater: dict | None = None
    reward_errors: int = 0  # over the whole run, resumes included
    reward_timeouts: int = 0
    async_state: dict | None = None  # AsyncRolloutProducer.state_dict() of an async checkpoint


def _peek_extra_state(root: str) -> dict | None:
    """The ``extra_state`` of the checkpoint ``root`` resolves to (read from its common state)."""
    from megatron.core import dist_checkpointing

    from sfpo_megatron.components.checkpoint import resolve_load_dir

    found = resolve_load_dir(root)
    if found is None:
        return None
    return dict(dist_checkpointing.load_common_state_dict(found[0]).get("extra_state") or {})


def init_policy(args: argparse.Namespace, setup, arch) -> RunState:
    """Resume from --save, else initialise from --load / --hf-checkpoint (see the module doc)."""
    from sfpo_megatron.components.checkpoint import CheckpointError, load_checkpoint, resolve_load_dir
    from sfpo_megatron.conversion.hf_mapping import load_hf_weights

    if args.save and resolve_load_dir(args.save) is not None:
        res = load_checkpoint(args.save, setup.model, setup.optimizer, setup.scheduler)
        state = res.extra_state.get(STATE_KEY)
        if state is None:
            raise CheckpointError(f"--save {args.save} holds a checkpoint that is not an RL checkpoint "
                                  f"(no {STATE_KEY!r} state): point --save at a new directory")
        log.info("resuming RL run from %s at step %d", args.save, res.iteration)
        return _run_state(state)
    if args.load:
        extra = _peek_extra_state(args.load)
        if extra is None:
            raise CheckpointError(f"--load {args.load} holds no checkpoint")
        rl_state = extra.get(STATE_KEY)
        resume = rl_state is not None and not args.finetune
        res = load_checkpoint(args.load, setup.model, setup.optimizer, setup.scheduler,
                              load_optim=resume and not args.no_load_optim,
                              load_rng=resume and not args.no_load_rng)
        if not res.loaded_optimizer:
            setup.optimizer.reload_model_params()
        log.info("policy from %s (%s)", args.load, "resuming its RL state" if resume else "weights only")
        return _run_state(rl_state) if resume else RunState()
    if args.hf_checkpoint:
        load_hf_weights(setup.model, arch, args.hf_checkpoint)
        setup.optimizer.reload_model_params()
        log.info("policy from HF weights %s", args.hf_checkpoint)
        return RunState()
    log.warning("no --save checkpoint, --load or --hf-checkpoint: the policy starts from random weights")
    return RunState()


def _run_state(state: dict) -> RunState:
    if state.get("version") != _STATE_VERSION:
        raise ValueError(f"RL checkpoint state version {state.get('version')!r} is not {_STATE_VERSION}")
    return RunState(step=int(state["step"]), weight_version=int(state["weight_version"]),
                    sampler=state["sampler"], updater=state["updater"],
                    reward_errors=int(state["reward_errors"]), reward_timeouts=int(state["reward_timeouts"]),
                    async_state=state.get("async"))


class RLRun:
    """Everything one ``sfpo-megatron rl`` process holds; ``run()`` drives the steps."""

    def __init__(self, args: argparse.Namespace, sglang_args: Sequence[str] = ()) -> None:
        self.args = args
        self.sglang_args = list(sglang_args)
        self.engines = None
        self.rewards = None
        self.metrics_logger = None
        self.preemption = None
        self.producer = None  # AsyncRolloutProducer on global rank 0 with --async-rollout
        self.batch_log = None
        self.tmpdir: str | None = None

    # ---- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        from sfpo_megatron.distributed import parallel
        from sfpo_megatron.distributed.platform import setup_platform
        from sfpo_megatron.models.hf_config import load_hf_config
        from sfpo_megatron.rl.sfpo import PolicyUpdater
        from sfpo_megatron.rl.train_batch import check_update_layout
        from sfpo_megatron.rollout.refit import RolloutEngines, check_rollout_args, on_rank0
        from sfpo_megatron.train.model_setup import build_training_setup
        from sfpo_megatron.train.pretrain import check_args

        a = self.args
        check_rl_args(a)
        check_rollout_args(a)
        setup_platform()
        self.arch = load_hf_config(a.model_config)
        world = parallel.read_dist_env().world_size
        batch = a.rollout_batch_size * a.n_samples_per_prompt
        a.global_batch_size = batch // a.num_steps_per_rollout  # one optimizer step's samples
        dp = check_args(a, self.arch, world)
        check_update_layout(batch, a.num_steps_per_rollout, dp, a.micro_batch_size)
        parallel.initialize(tp=a.tensor_model_parallel_size, pp=a.pipeline_model_parallel_size,
                            vpp=a.virtual_pipeline_model_parallel_size, seed=a.seed,
                            timeout_minutes=a.distributed_timeout_minutes)
        self.rank = dist.get_rank()
        a.calculate_per_token_loss = False  # the RL losses normalise over the mini-batch themselves
        self.setup_ = build_training_setup(a, self.arch, total_scheduler_steps=max(a.num_rollouts, 1))
        self.tokenizer = load_rl_tokenizer(a)
        self.updater = PolicyUpdater(a, self.setup_, pad_id=self.tokenizer.pad_id)
        self.state = init_policy(a, self.setup_, self.arch)
        if self.state.updater is not None:
            self.updater.load_state_dict(self.state.updater)
        self._setup_rank0_data()
        # Exported weights, refit files and server logs: kept under --save, else a temporary
        # directory of rank 0 (the only rank that writes there), removed at the end.
        if not a.save and self.rank == 0:
            self.tmpdir = tempfile.mkdtemp(prefix="sfpo_rollout_")
        workdir = os.path.join(a.save, "rollout") if a.save else (self.tmpdir or "")
        self.engines = RolloutEngines(a, a.model_config, workdir, tokenizer_side_dirs(a, self.tokenizer),
                                      self.sglang_args)
        self.engines.start(self.setup_.model, self.state.weight_version)
        if a.async_rollout:
            on_rank0(self._start_producer)

    def _setup_rank0_data(self) -> None:
        from sfpo_megatron.data.prompts import PromptSampler, load_eval_datasets, load_prompt_dataset
        from sfpo_megatron.data.rewards import RewardRunner
        from sfpo_megatron.rl.evaluate import dataset_kwargs
        from sfpo_megatron.rollout.refit import on_rank0

        a = self.args
        self.dataset = self.sampler = self.eval_datasets = None

        def build() -> None:
            kwargs = dataset_kwargs(a)
            self.dataset = load_prompt_dataset(a.prompt_data, self.tokenizer, **kwargs)
            self.sampler = PromptSampler(self.dataset, a.rollout_batch_size, seed=a.seed)
            if a.async_rollout and self.state.async_state is not None:
                # Continue after the finished batches the checkpoint carries (trained next).
                self.sampler.load_state_dict(self.state.async_state["resume_sampler"])
            elif self.state.sampler is not None:
                self.sampler.load_state_dict(self.state.sampler)
            self.eval_datasets = load_eval_datasets(a.eval_prompt_data, self.tokenizer, **kwargs)
            self.rewards = RewardRunner(a.reward_fn, a.reward_num_workers, a.reward_timeout)

        on_rank0(build)

    def _start_producer(self) -> None:
        from sfpo_megatron.rl.async_rollout import AsyncRolloutProducer, result_from_state

        a, st = self.args, self.state
        pending = [result_from_state(r) for r in (st.async_state or {}).get("pending", [])]
        worker = RolloutWorker(a, self.engines.client, self.tokenizer, self.dataset, self.sampler, self.rewards)
        self.producer = AsyncRolloutProducer(
            lambda step: worker.collect(step, None), self.sampler, max_staleness=a.max_staleness,
            weight_version=st.weight_version, next_step=st.step + 1, last_step=a.num_rollouts,
            pending=pending).start()
        log.info("asynchronous rollouts: max staleness %d, %d finished batches restored", a.max_staleness,
                 len(pending))

    # ---- steps -----------------------------------------------------------------------------------

    def run(self) -> dict[str, float]:
        """All steps; returns the last step's metrics (on every rank)."""
        from sfpo_megatron.components.metrics import MetricsLogger
        from sfpo_megatron.components.preemption import PreemptionHandler
        from sfpo_megatron.rollout.refit import on_rank0

        a, st = self.args, self.state
        # A resumed run re-logs from the step after its checkpoint (TensorBoard purges from there).
        self.metrics_logger = MetricsLogger(a.log_dir, a.tensorboard_dir, rank=self.rank,
                                            start_iteration=st.step + 1 if st.step else None)
        # After the launcher: its SIGTERM hook (stop the servers) must not run before our checkpoint.
        self.preemption = PreemptionHandler().install()
        last: dict[str, float] = {}
        saved = st.step  # the checkpoint this run started from (or 0)
        if st.step == 0 and a.eval_interval:  # the starting point of the validation curve
            last = on_rank0(lambda: self._evaluate(0))
            self._log(0, last)
        while st.step < a.num_rollouts:
            last = self.step(st.step + 1)
            stop = self.preemption.should_stop()
            due = a.save_interval and st.step % a.save_interval == 0
            if a.save and (stop or due):
                self.save()
                saved = st.step
            if stop:
                raise Preempted(st.step)
        if a.save and saved != st.step:
            self.save()
        return last

    def step(self, step: int) -> dict[str, float]:
        from sfpo_megatron.rollout.refit import on_rank0

        from sfpo_megatron.rl.async_rollout import check_staleness, staleness_metrics

        a, st = self.args, self.state
        t0 = time.perf_counter()
        if a.async_rollout:
            rollout = on_rank0(lambda: self._take_async_batch(step))
            versions = [s.weight_version for s in rollout.samples]
            check_staleness(versions, st.weight_version, a.max_staleness, step)
            rollout.metrics.update(staleness_metrics(versions, st.weight_version, a.max_staleness))
        else:
            rollout = on_rank0(lambda: self._rollout_rank0(step))
        if self.rank == 0:
            self._log_batch(step, rollout)
        self.engines.release_memory()  # colocated: the servers give the devices to training
        update = self.updater.update(rollout.samples, step)
        refit = self.engines.refit(self.setup_.model, st.weight_version + 1)
        st.weight_version += 1
        st.step = step
        if self.producer is not None:
            self.producer.weights_updated(st.weight_version)
        st.reward_errors += int(rollout.metrics["rollout/reward_errors"])
        st.reward_timeouts += int(rollout.metrics["rollout/reward_timeouts"])
        metrics = {**rollout.metrics, **update, **refit.metrics(),
                   "rollout/reward_errors_total": float(st.reward_errors),
                   "rollout/reward_timeouts_total": float(st.reward_timeouts)}
        metrics["rollout/train_inference_logprob_gap"] = update["rollout/train_logprob_abs_diff"]
        if a.eval_interval and step % a.eval_interval == 0:
            metrics.update(on_rank0(lambda: self._evaluate(step)))
        metrics["time/step_s"] = time.perf_counter() - t0
        metrics["weight_version"] = float(st.weight_version)
        self._log(step, metrics)
        return metrics

    def _take_async_batch(self, step: int) -> RolloutResult:
        result = self.producer.get(step)
        result.metrics["time/rollout_wait_s"] = self.producer.wait_s
        result.metrics["async/queued_batches"] = float(self.producer.queued())
        return result

    def _log_batch(self, step: int, rollout: RolloutResult) -> None:
        """``{log_dir}/rollout_batches.jsonl``: what each step trained on (prompt, version, reward
        per sample) — a resumed run appends, the last line of a step wins (as metrics.jsonl)."""
        if not self.args.log_dir:
            return
        import json

        os.makedirs(self.args.log_dir, exist_ok=True)
        record = {"step": step, "trained_weight_version": self.state.weight_version,
                  "prompt_index": [s.prompt_index for s in rollout.samples],
                  "weight_version": [s.weight_version for s in rollout.samples],
                  "reward": [s.reward for s in rollout.samples]}
        with open(os.path.join(self.args.log_dir, BATCH_LOG), "a") as f:
            f.write(json.dumps(record) + "\n")

    def _rollout_rank0(self, step: int) -> RolloutResult:
        worker = RolloutWorker(self.args, self.engines.client, self.tokenizer, self.dataset, self.sampler,
                               self.rewards)
        return worker.collect(step, self.state.weight_version)

    def _evaluate(self, step: int) -> dict[str, float]:
        from sfpo_megatron.rl.evaluate import eval_params, evaluate

        return evaluate(self.engines.client, self.eval_datasets, self.tokenizer, self.rewards,
                        n=self.args.n_samples_per_eval_prompt, params=eval_params(self.args, self.tokenizer),
                        seed=self.args.seed, step=step, expected_version=str(self.state.weight_version))

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        from sfpo_megatron.components.metrics import memory_stats
        from sfpo_megatron.train.model_setup import device

        self.metrics_logger.log(step, {**metrics, **memory_stats(device())})
        if self.rank == 0:
            keys = [k for k in ("rollout/reward_mean", "rollout/accuracy", "sfpo/alpha",
                                "rollout/train_inference_logprob_gap", "time/step_s") if k in metrics]
            keys += sorted(k for k in metrics if k.startswith("eval/") and "@" in k)
            log.info("step %d: %s", step, " ".join(f"{k}={metrics[k]:.4g}" for k in keys))

    def save(self) -> None:
        from sfpo_megatron.components.checkpoint import save_checkpoint
        from sfpo_megatron.rollout.refit import on_rank0

        st = self.state

        def state() -> dict:
            rl = {"version": _STATE_VERSION, "step": st.step, "weight_version": st.weight_version,
                  "sampler": self.sampler.state_dict(), "updater": self.updater.state_dict(),
                  "reward_errors": st.reward_errors, "reward_timeouts": st.reward_timeouts}
            if self.producer is not None:
                rl["async"] = self.producer.state_dict()
                # A synchronous resume regenerates the untrained batches from the first of them.
                rl["sampler"] = rl["async"]["start_sampler"]
            return {STATE_KEY: rl}

        # The sampler lives on rank 0; every rank saves the same extra_state.
        extra = on_rank0(state)
        save_checkpoint(self.args.save, st.step, self.setup_.model, self.setup_.optimizer,
                        self.setup_.scheduler, extra, optim_sharding=self.args.dist_ckpt_optim_sharding)

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close()
        if self.preemption is not None:
            self.preemption.uninstall()
        if self.metrics_logger is not None:
            self.metrics_logger.close()
        if self.rewards is not None:
            self.rewards.close()
        if self.engines is not None:
            self.engines.close()
        if self.producer is not None:
            self.producer.join()
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


def run(args: argparse.Namespace, sglang_args: Sequence[str] = ()) -> dict[str, float]:
    """Set up and run the loop; returns the last step's metrics (tests, benchmarks, the demo)."""
    rl = RLRun(args, sglang_args)
    try:
        rl.setup()
        return rl.run()
    finally:
        rl.close()


def main(argv: list[str] | None = None) -> int:
    from sfpo_megatron.arguments import build_rl_parser
    from sfpo_megatron.components.preemption import EXIT_CODE
    from sfpo_megatron.distributed import parallel
    from sfpo_megatron.rollout.sglang_launcher import split_sglang_args

    argv, sglang_args = split_sglang_args(list(sys.argv[1:] if argv is None else argv))
    args = build_rl_parser().parse_args(argv)
    try:
        run(args, sglang_args)
    except Preempted as e:
        log.warning("%s: checkpoint written, exiting with %d", e, EXIT_CODE)
        return EXIT_CODE
    except user_errors() as e:
        print(f"sfpo-megatron rl: error: {e}", file=sys.stderr)
        return 2
    finally:
        parallel.destroy()
    return 0
