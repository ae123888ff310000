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
re-raised on every rank (``distributed.rank0.on_rank0``), so no rank hangs in a collective.

Checkpoints are written atomically (components/checkpoint.py), so a run killed at any moment,
SIGKILL included, restarts with the same command from the last complete checkpoint (``rl/state.py``).
With ``--rollout-deterministic`` every rollout is a function of (weights, prompt, seed) and the
restarted run's metrics equal an uninterrupted run's bit for bit (CPU, fixed thread counts).
SIGTERM / SIGUSR1 checkpoint at the end of the current step and exit with 143, also when sent to
the whole process group (the save's helper processes start with them blocked). A rollout server
that dies or hangs is dropped and the run goes on with the others (rollout/transport.py).

``--async-rollout --max-staleness k``: rank 0's ``AsyncRolloutProducer`` (rollout/async_producer.py)
generates batch s as soon as the servers hold version ≥ s − 1 − k, in a thread, while the
trainer trains earlier batches (``--async-exact-staleness``: each refit to version v first waits
for batch v + k, so batch s is generated with exactly version max(0, s − 1 − k)); each sample
keeps the version it was generated with, the step checks the bound, logs the staleness
histogram and ``rollout_batches.jsonl``, and the update computes importance weights / ESS
(update/off_policy.py; corrected with ``--vcpo``). Checkpoints carry the finished, untrained
batches: a restart (async or not) trains every prompt once.
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

import torch.distributed as dist

from sfpo_megatron.components.checkpoint import save_checkpoint
from sfpo_megatron.components.metrics import MetricsLogger, memory_stats
from sfpo_megatron.components.preemption import PreemptionHandler
from sfpo_megatron.data.prompts import PromptSampler, dataset_kwargs, load_eval_datasets, load_prompt_dataset
from sfpo_megatron.data.rewards import reward_fn_from_args, reward_runner_from_args
from sfpo_megatron.data.tokenizer import tokenizer_from_args
from sfpo_megatron.distributed import parallel
from sfpo_megatron.distributed.platform import current_platform, setup_platform
from sfpo_megatron.distributed.rank0 import on_rank0
from sfpo_megatron.errors import UserError
from sfpo_megatron.models.hf_config import load_hf_config
from sfpo_megatron.records import RolloutBatch
from sfpo_megatron.rl.evaluate import eval_params, evaluate
from sfpo_megatron.rl.state import STATE_KEY, STATE_VERSION, init_policy, restore_sampler
from sfpo_megatron.rollout.async_producer import (
    AsyncRolloutProducer,
    batch_from_state,
    check_staleness,
    staleness_metrics,
)
from sfpo_megatron.rollout.engines import RolloutEngines, check_rollout_args, tokenizer_side_dirs
from sfpo_megatron.rollout.generate import RolloutWorker, multi_turn_from_args
from sfpo_megatron.rollout.tools import load_tool
from sfpo_megatron.trainer.model_setup import build_reference_model, build_training_setup
from sfpo_megatron.trainer.offload import TrainStateOffload
from sfpo_megatron.trainer.pretrain import check_args
from sfpo_megatron.trainer.train_batch import check_update_layout
from sfpo_megatron.update.policy_update import PolicyUpdater, check_update_args

log = logging.getLogger("sfpo_megatron.rl")

BATCH_LOG = "rollout_batches.jsonl"


class RLConfigError(UserError):
    """RL flags that cannot work together, named with their values."""


class Preempted(Exception):
    """SIGTERM / SIGUSR1 arrived: checkpointed at ``step``; exit with 143."""

    def __init__(self, step: int) -> None:
        super().__init__(f"preempted after step {step}")
        self.step = step


def check_multi_turn_args(args: argparse.Namespace) -> None:
    """``--rollout-mode multi-turn``'s limits and tool, checked before any process starts."""
    if args.rollout_mode != "multi-turn":
        return
    if args.max_turns < 1:
        raise RLConfigError(f"--max-turns must be >= 1, got {args.max_turns}")
    if args.max_total_response_len is not None and args.max_total_response_len < 1:
        raise RLConfigError(f"--max-total-response-len must be >= 1, got {args.max_total_response_len}")
    load_tool(args.tool).close()  # a --tool that does not import stops here


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
    if args.async_exact_staleness and not args.async_rollout:
        raise RLConfigError("--async-exact-staleness fixes the asynchronous schedule: add --async-rollout "
                            "(synchronous rollouts always use the current weights)")
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
    if args.reward_format_score is not None:
        reward_fn_from_args(args)  # refuses a format score the reward function does not take
    if args.load and args.hf_checkpoint:
        raise RLConfigError(f"give one policy initialisation: --load {args.load} or --hf-checkpoint "
                            f"{args.hf_checkpoint}, not both")
    if args.kl_coef > 0 and not args.ref_load:
        raise RLConfigError(f"--kl-coef {args.kl_coef} needs the frozen reference policy: add --ref-load "
                            "CKPT_DIR (e.g. the checkpoint the run starts from)")
    if args.kl_coef < 0:
        raise RLConfigError(f"--kl-coef must be >= 0, got {args.kl_coef}")
    if not args.rollout_temperature > 0:
        raise RLConfigError(f"--rollout-temperature must be > 0 (the trainer's logprobs use it), "
                            f"got {args.rollout_temperature}")
    check_offload_args(args)
    check_multi_turn_args(args)
    check_update_args(args)  # --ppo-epochs, --no-ppo-clip with several steps, ...
    check_context_parallel(args)


def check_offload_args(args: argparse.Namespace) -> None:
    if args.offload_train and not args.colocate:
        raise RLConfigError("--offload-train frees the trainer's GPU memory for rollout servers that share its "
                            "GPUs: add --colocate (disaggregated servers have GPUs of their own)")
    if args.optimizer_cpu_offload and not args.use_distributed_optimizer:
        raise RLConfigError("--optimizer-cpu-offload runs megatron-core's HybridDeviceOptimizer inside the "
                            "distributed optimizer: add --use-distributed-optimizer")


def check_context_parallel(args: argparse.Namespace) -> None:
    """``--context-parallel-size``: each packed sequence split over the CP group (load-balanced
    chunks); only packed micro-batches can be split, and per-trajectory exact gradient norms
    cannot. Refused before anything is built."""
    cp = args.context_parallel_size
    if cp == 1:
        return
    if cp < 1:
        raise RLConfigError(f"--context-parallel-size must be >= 1, got {cp}")
    if not args.use_dynamic_batch_size:
        raise RLConfigError(f"--context-parallel-size {cp} splits packed sequences over ranks: add "
                            "--use-dynamic-batch-size --max-tokens-per-gpu N")
    if args.off_policy_baseline == "opob" and args.opob_grad_norm == "exact":
        raise RLConfigError(f"--context-parallel-size {cp}: --opob-grad-norm exact takes per-trajectory "
                            "gradients, which context parallelism splits over ranks: use "
                            "--opob-grad-norm logit")


def check_rl_layout(args: argparse.Namespace, arch, world_size: int) -> int:
    """The layout and batch checks of ``rl`` on ``world_size`` ranks (also ``sfpo-megatron
    plan``'s); sets ``args.global_batch_size`` and returns the data-parallel size."""
    batch = args.rollout_batch_size * args.n_samples_per_prompt
    args.global_batch_size = batch // args.num_steps_per_rollout  # one optimizer step's samples
    dp = check_args(args, arch, world_size)
    # Packed micro-batches are cut by tokens, not rows: only the DP split needs to divide.
    check_update_layout(batch, args.num_steps_per_rollout, dp,
                        1 if args.use_dynamic_batch_size else args.micro_batch_size)
    return dp


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
        self.offload: TrainStateOffload | None = None
        self.tmpdir: str | None = None

    # ---- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        a = self.args
        check_rl_args(a)
        check_rollout_args(a)
        setup_platform()
        self.arch = load_hf_config(a.model_config)
        check_rl_layout(a, self.arch, parallel.read_dist_env().world_size)
        parallel.initialize(tp=a.tensor_model_parallel_size, pp=a.pipeline_model_parallel_size,
                            vpp=a.virtual_pipeline_model_parallel_size, seed=a.seed,
                            timeout_minutes=a.distributed_timeout_minutes, cp=a.context_parallel_size,
                            ep=a.expert_model_parallel_size, etp=a.expert_tensor_parallel_size)
        self.rank = dist.get_rank()
        a.calculate_per_token_loss = False  # the RL losses normalise over the mini-batch themselves
        self.setup_ = build_training_setup(a, self.arch, total_scheduler_steps=max(a.num_rollouts, 1))
        self.tokenizer = tokenizer_from_args(a)
        # The frozen reference policy of the KL term, same layout as the policy.
        ref_model = build_reference_model(a, self.arch, a.ref_load) if a.kl_coef > 0 else None
        self.updater = PolicyUpdater(a, self.setup_, ref_model=ref_model, pad_id=self.tokenizer.pad_id)
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
        self.offload = self._train_offload()
        if self.offload is not None:
            self.offload.to_host()  # the servers generate the first batch
        if a.async_rollout:
            on_rank0(self._start_producer)

    def _train_offload(self) -> TrainStateOffload | None:
        if not self.args.offload_train:
            return None
        if not current_platform().is_cuda:
            if self.rank == 0:
                log.info("--offload-train: no GPU on this machine, the trainer's state already lives in "
                         "host memory: nothing to offload")
            return None
        return TrainStateOffload(self.setup_.model, self.setup_.optimizer)

    def _setup_rank0_data(self) -> None:
        a = self.args
        self.dataset = self.sampler = self.eval_datasets = None

        def build() -> None:
            kwargs = dataset_kwargs(a)
            self.dataset = load_prompt_dataset(a.prompt_data, self.tokenizer, **kwargs)
            self.sampler = PromptSampler(self.dataset, a.rollout_batch_size, seed=a.seed)
            if a.async_rollout and self.state.async_state is not None:
                # Continue after the finished batches the checkpoint carries (trained next).
                restore_sampler(self.sampler, self.state.async_state["resume_sampler"], a)
            elif self.state.sampler is not None:
                restore_sampler(self.sampler, self.state.sampler, a)
            self.eval_datasets = load_eval_datasets(a.eval_prompt_data, self.tokenizer, **kwargs)
            self.rewards = reward_runner_from_args(a)

        on_rank0(build)

    def _start_producer(self) -> None:
        a, st = self.args, self.state
        pending = [batch_from_state(r) for r in (st.async_state or {}).get("pending", [])]
        worker = RolloutWorker(a, self.engines.client, self.tokenizer, self.dataset, self.sampler, self.rewards)
        self.producer = AsyncRolloutProducer(
            lambda step: worker.collect(step, None), self.sampler, max_staleness=a.max_staleness,
            weight_version=st.weight_version, next_step=st.step + 1, last_step=a.num_rollouts,
            pending=pending).start()
        log.info("asynchronous rollouts: max staleness %d%s, %d finished batches restored", a.max_staleness,
                 " (exact)" if a.async_exact_staleness else "", len(pending))

    # ---- steps -----------------------------------------------------------------------------------

    def run(self) -> dict[str, float]:
        """All steps; returns the last step's metrics (on every rank)."""
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
        if self.offload is not None:
            self.offload.to_device()
        update = self.updater.update(rollout.samples, step)
        refit_wait_s = 0.0
        if a.async_exact_staleness:
            # Refit to version `step` only after batch step + k: no batch sees two versions.
            # Every rank waits in the broadcast, so all take the same path to the refit.
            t_wait = time.perf_counter()
            on_rank0(lambda: self.producer.wait_until_produced(step + a.max_staleness))
            refit_wait_s = time.perf_counter() - t_wait
        refit = self.engines.refit(self.setup_.model, st.weight_version + 1,
                                   after_push=self.offload.to_host if self.offload is not None else None)
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
        if a.async_exact_staleness:
            metrics["time/exact_staleness_wait_s"] = refit_wait_s
        metrics["time/step_s"] = time.perf_counter() - t0
        metrics["weight_version"] = float(st.weight_version)
        self._log(step, metrics)
        return metrics

    def _take_async_batch(self, step: int) -> RolloutBatch:
        result = self.producer.get(step)
        result.metrics["time/rollout_wait_s"] = self.producer.wait_s
        result.metrics["async/queued_batches"] = float(self.producer.queued())
        return result

    def _log_batch(self, step: int, rollout: RolloutBatch) -> None:
        """``{log_dir}/rollout_batches.jsonl``: what each step trained on (prompt, version, reward
        per sample) — a resumed run appends, the last line of a step wins (as metrics.jsonl)."""
        if not self.args.log_dir:
            return
        os.makedirs(self.args.log_dir, exist_ok=True)
        record = {"step": step, "trained_weight_version": self.state.weight_version,
                  "prompt_index": [s.prompt_index for s in rollout.samples],
                  "weight_version": [s.weight_version for s in rollout.samples],
                  "reward": [s.reward for s in rollout.samples]}
        with open(os.path.join(self.args.log_dir, BATCH_LOG), "a") as f:
            f.write(json.dumps(record) + "\n")

    def _rollout_rank0(self, step: int) -> RolloutBatch:
        worker = RolloutWorker(self.args, self.engines.client, self.tokenizer, self.dataset, self.sampler,
                               self.rewards)
        return worker.collect(step, self.state.weight_version)

    def _evaluate(self, step: int) -> dict[str, float]:
        return evaluate(self.engines.client, self.eval_datasets, self.tokenizer, self.rewards,
                        n=self.args.n_samples_per_eval_prompt, params=eval_params(self.args, self.tokenizer),
                        seed=self.args.seed, step=step, expected_version=str(self.state.weight_version),
                        multi_turn=multi_turn_from_args(self.args, self.engines.client, self.tokenizer))

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics_logger.log(step, {**metrics, **memory_stats(current_platform().device())})
        if self.rank == 0:
            keys = [k for k in ("rollout/reward_mean", "rollout/accuracy", "sfpo/alpha",
                                "rollout/train_inference_logprob_gap", "time/step_s") if k in metrics]
            keys += sorted(k for k in metrics if k.startswith("eval/") and "@" in k)
            log.info("step %d: %s", step, " ".join(f"{k}={metrics[k]:.4g}" for k in keys))

    def save(self) -> None:
        st = self.state

        def state() -> dict:
            rl = {"version": STATE_VERSION, "step": st.step, "weight_version": st.weight_version,
                  "sampler": self.sampler.state_dict(), "updater": self.updater.state_dict(),
                  "reward_errors": st.reward_errors, "reward_timeouts": st.reward_timeouts}
            if self.producer is not None:
                rl["async"] = self.producer.state_dict()
                # A synchronous resume regenerates the untrained batches from the first of them.
                rl["sampler"] = rl["async"]["start_sampler"]
            return {STATE_KEY: rl}

        # The sampler lives on rank 0; every rank saves the same extra_state.
        extra = on_rank0(state)
        offloaded = self.offload is not None and self.offload.on_host
        if offloaded:  # the checkpoint reads the device buffers
            self.offload.to_device()
        # The save's helper processes must outlive a group-wide SIGTERM (see components/preemption.py).
        with self.preemption.deferred():
            save_checkpoint(self.args.save, st.step, self.setup_.model, self.setup_.optimizer,
                            self.setup_.scheduler, extra, optim_sharding=self.args.dist_ckpt_optim_sharding)
        if offloaded:
            self.offload.to_host()

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
