"""The demo's phases, each a real run of the project's own tools:

1. task, SentencePiece tokenizer, SFT corpus and a tiny Qwen2 config (`task.py`);
2. `tools/preprocess_data.py`: the corpus → megatron indexed dataset;
3. `sfpo-megatron pretrain` under `torchrun` (2 processes, data parallel): the SFT warm start;
4. `tools/convert_mcore_to_hf.py`: the warm start → HF safetensors;
5. `sfpo-megatron rl` for the three arms from that HF checkpoint, same seed, through the CPU
   rollout server (one trainer process each; the runs go side by side by default): SFPO, GRPO
   (one pass over each rollout batch) and GRPO with `--ppo-epochs K+1` (`grpo-eK+1`: as many
   optimizer steps per rollout batch as SFPO's K fast passes and its slow one, no reposition).

Every phase writes under `DemoConfig.out`; subprocess output goes to `out/logs/*.log` and a
progress bar follows each run's `metrics.jsonl`.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import transformers
from tqdm import tqdm

from sfpo_megatron.data.tokenizer import load_tokenizer
from sfpo_megatron.demo.task import (
    TOOL_CALL,
    TOOL_OUTPUT,
    TOOL_TASK,
    TRAIN_SEED,
    VALID_SEED,
    build_tokenizer,
    get_task,
    heldout_split,
    sft_corpus,
    tool_sft_corpus,
    write_jsonl,
)
from sfpo_megatron.errors import UserError

REPO = Path(__file__).resolve().parents[2]
REWARD_FN = "sfpo_megatron.demo.task:exact_match_reward"
METHODS = ("grpo", "sfpo")  # the --algorithm values


class DemoError(UserError, RuntimeError):
    """A phase failed; the message names it and ends with the tail of its log."""


@dataclass
class DemoConfig:
    """Sizes and hyper-parameters; `quick()` shrinks them for tests.

    Chosen by measurement on 2 CPU cores: a ~100k-parameter model learns one-digit sums in about
    550 SFT iterations (~1 min); a 0.8M-parameter one needed over 8x the time per iteration.
    RL: Adam at 1e-3 wrecked the warm start within one step, 1e-4 moved nothing in 20 steps;
    3e-4 with a 3-step warmup and 4 mini-batches per rollout batch (the paper's 256/64 prompts)
    improves it steadily. SFPO uses the paper's K = 3, alpha = 0.8, omega = 30, tau = 1.
    """

    out: Path = Path("demo_out")
    task: str = "basic_arithmetic"
    seed: int = 0
    # tokenizer and model (Qwen2 shape, ~100k parameters)
    vocab_size: int = 64
    hidden_size: int = 64
    ffn_hidden_size: int = 192
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    # SFT warm start (plain next-token loss on "prompt answer<eos>" documents): the LR schedule
    # spans sft_iters, but training stops as soon as the mean loss of the last sft_loss_window
    # iterations reaches the task's sft_target_loss (see LossTarget).
    sft_docs: int = 30_000
    sft_iters: int = 1500
    sft_stop_at_target: bool = True
    sft_loss_window: int = 20
    sft_lr: float = 1e-2
    sft_min_lr: float = 1e-4
    sft_warmup: int = 20
    sft_seq_length: int = 64
    sft_global_batch: int = 32
    sft_nproc: int = 2
    # RL (both methods)
    rl_steps: int = 40
    rollout_prompts: int = 64
    samples_per_prompt: int = 8
    mini_batches: int = 4  # optimizer steps per pass over a rollout batch (paper: 256 / 64)
    rl_lr: float = 3e-4
    rl_warmup: int = 3
    max_response_len: int = 6
    train_prompts: int = 20_000
    eval_prompts: int = 500
    eval_samples: int = 2
    eval_interval: int = 5
    eval_top_p: float = 0.7  # the paper's validation: temperature 1, top-p 0.7
    sfpo_inner_steps: int = 3
    sfpo_alpha: float = 0.8
    sfpo_window: int = 30
    sfpo_threshold: float = 1.0
    side_by_side: bool = True  # the RL arms at the same time (they share the cores)
    extra_rl_flags: list[str] = field(default_factory=list)

    @classmethod
    def quick(cls, **overrides: Any) -> "DemoConfig":
        """A few minutes end to end: every phase runs, nothing is expected to learn."""
        small = dict(sft_docs=2_000, sft_iters=30, sft_stop_at_target=False, rl_steps=2, rollout_prompts=8,
                     samples_per_prompt=4, mini_batches=2, train_prompts=200, eval_prompts=32,
                     eval_interval=1, sfpo_window=2)
        return cls(**{**small, **overrides})

    @property
    def equal_steps_arm(self) -> str:
        """GRPO with SFPO's optimizer steps per rollout batch: K + 1 passes, no reposition."""
        return f"grpo-e{self.sfpo_inner_steps + 1}"

    @property
    def arms(self) -> dict[str, tuple[str, int]]:
        """RL arms, controls first: {name: (--algorithm, --ppo-epochs)}."""
        return {"grpo": ("grpo", 1), self.equal_steps_arm: ("grpo", self.sfpo_inner_steps + 1),
                "sfpo": ("sfpo", 1)}

    @property
    def passes_per_batch(self) -> dict[str, int]:
        """Optimizer passes over a rollout batch per arm (SFPO: K fast + 1 slow until its switch-off)."""
        return {arm: epochs for arm, (_, epochs) in self.arms.items()} | {"sfpo": self.sfpo_inner_steps + 1}

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


@dataclass
class Paths:
    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def sft_jsonl(self) -> Path:
        return self.root / "data" / "sft.jsonl"

    @property
    def sft_prefix(self) -> Path:
        return self.root / "data" / "sft"

    @property
    def tokenizer(self) -> Path:
        return self.root / "data" / "tokenizer.model"

    @property
    def model_config(self) -> Path:
        return self.root / "model"

    @property
    def prompts(self) -> Path:
        """Where a task with held-out questions keeps its train / valid prompt files."""
        return self.root / "data"

    @property
    def sft_ckpt(self) -> Path:
        return self.root / "sft_ckpt"

    @property
    def hf(self) -> Path:
        return self.root / "warm_start_hf"

    def rl(self, name: str) -> Path:
        return self.root / f"rl_{name}"


# ------------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # one core per process: 2 cores are shared by design
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


@dataclass
class Job:
    """A subprocess in its own session (so it and its children can be stopped together)."""

    name: str
    cmd: list[str]
    log: Path
    metrics: Path | None = None
    total: int = 0
    # Called with the job and its metrics records at every poll (e.g. to stop SFT early).
    watch: Callable[["Job", list[dict[str, Any]]], None] | None = None
    ok_codes: tuple[int, ...] = (0,)
    proc: subprocess.Popen | None = None

    def start(self) -> "Job":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as f:
            f.write("$ " + " ".join(self.cmd) + "\n")
            f.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                         env=child_env(), start_new_session=True)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def records(self) -> list[dict[str, Any]]:
        """The complete lines of the job's metrics.jsonl so far."""
        if self.metrics is None or not self.metrics.exists():
            return []
        with open(self.metrics) as f:
            return [json.loads(line) for line in f if line.strip().endswith("}")]

    def signal_workers(self, sig: int) -> None:
        """Send `sig` to the job's trainer processes: torchrun's workers, or the job itself."""
        me = psutil.Process(self.proc.pid)
        if "torchrun" in Path(self.cmd[0]).name:  # only its trainer ranks, no helper processes
            workers = [c for c in me.children() if "sfpo_megatron.cli" in " ".join(c.cmdline())]
        else:
            workers = [me]
        for w in workers:
            w.send_signal(sig)

    def failure(self) -> DemoError:
        tail = self.log.read_text(errors="replace").splitlines()[-40:] if self.log.exists() else []
        return DemoError(f"{self.name} failed (exit code {self.proc.returncode if self.proc else '?'}); "
                         f"log {self.log}:\n" + "\n".join(tail))


def _latest(records: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """(last iteration, its record with the newest eval metrics merged in)."""
    last: dict[str, Any] = {}
    evals: dict[str, Any] = {}
    for rec in records:
        last = rec
        evals.update({k: v for k, v in rec.items() if k.startswith("eval/") and "@" in k})
    return int(last.get("iteration", 0)), {**last, **evals}


def _postfix(rec: dict[str, Any]) -> str:
    if "lm_loss" in rec:
        return f"loss {rec['lm_loss']:.3f}"
    acc = [f"val {100 * v:.1f}%" for k, v in rec.items() if k.startswith("eval/") and "/avg@" in k]
    return " ".join(acc[:1])


def run_jobs(jobs: Sequence[Job], show_progress: bool = True) -> None:
    """Start the jobs, show one progress bar each, wait; any failure stops the others."""
    bars = [tqdm(total=j.total or None, desc=j.name, position=i, leave=True, dynamic_ncols=True,
                 disable=not show_progress, file=sys.stderr, unit="step")
            for i, j in enumerate(jobs)]
    try:
        for job in jobs:
            job.start()
        pending = list(range(len(jobs)))
        while pending:
            time.sleep(0.5)
            for i in list(pending):
                job, bar = jobs[i], bars[i]
                records = job.records()
                it, rec = _latest(records)
                if job.watch is not None and job.proc.poll() is None:
                    job.watch(job, records)
                if it > bar.n:
                    bar.update(it - bar.n)
                text = _postfix(rec)
                if text:
                    bar.set_postfix_str(text, refresh=False)
                code = job.proc.poll()
                if code is not None:
                    pending.remove(i)
                    if code not in job.ok_codes:
                        raise job.failure()
                    bar.refresh()
    finally:
        for job in jobs:
            job.stop()
        for bar in bars:
            bar.close()


class Timer:
    """Wall-clock and CPU seconds (this process and its finished children) of one phase."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}

    def _cpu(self) -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def run(self, name: str, fn, *args, **kwargs):
        t0, c0 = time.perf_counter(), self._cpu()
        try:
            return fn(*args, **kwargs)
        finally:
            self.phases[name] = {"wall_s": time.perf_counter() - t0, "cpu_s": self._cpu() - c0}


# ------------------------------------------------------------------------------------------------
# Phases
# ------------------------------------------------------------------------------------------------


def _fresh(*dirs: Path) -> None:
    for d in dirs:
        if d.exists():
            shutil.rmtree(d)


def prepare(cfg: DemoConfig, paths: Paths) -> dict[str, Any]:
    """Tokenizer, SFT corpus (JSONL) and the tiny Qwen2 config; returns a summary."""
    task = get_task(cfg.task)
    _fresh(paths.sft_jsonl.parent, paths.model_config)
    tool = cfg.task == TOOL_TASK
    texts = tool_sft_corpus(cfg.sft_docs) if tool else sft_corpus(task, cfg.sft_docs)
    write_jsonl(texts, paths.sft_jsonl)
    model_file = build_tokenizer(texts, paths.tokenizer.with_suffix(""), cfg.vocab_size,
                                 TOOL_CALL + TOOL_OUTPUT if tool else ())
    tok = load_tokenizer(model_file)
    config = transformers.Qwen2Config(
        vocab_size=tok.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=max(128, cfg.sft_seq_length),
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
        tie_word_embeddings=True, rope_theta=10000.0)
    config.save_pretrained(paths.model_config)
    summary = {"task": task.name, "task_config": dict(task.config), "sft_docs": len(texts),
               "vocab_size": tok.vocab_size, "example": texts[0]}
    if task.heldout_fraction > 0:
        split = heldout_split(task, cfg.train_prompts, cfg.eval_prompts, paths.prompts)
        del split["paths"]  # under paths.prompts; machine paths stay out of the summary
        summary["heldout"] = {"fraction": task.heldout_fraction, **split}
    return summary


def preprocess_job(cfg: DemoConfig, paths: Paths) -> Job:
    cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(paths.sft_jsonl),
           "--output-prefix", str(paths.sft_prefix), "--tokenizer-type", "sentencepiece",
           "--tokenizer-path", str(paths.tokenizer), "--append-eod", "--no-progress"]
    return Job("tokenize SFT corpus", cmd, paths.logs / "preprocess.log")


class LossTarget:
    """Stops the SFT run once its smoothed training loss reaches the task's target.

    Where a tiny model starts to get the arithmetic right varies by a few hundred iterations
    with the initialisation and data order (measured: greedy accuracy after 600 iterations was
    77 % in one run and 9 % in another), while the loss tracks it closely: the prompt tokens'
    share of the loss is fixed, so the mean loss says how well the answers are predicted. The
    stop goes through the trainer's own preemption path: SIGUSR1 to every rank, which then
    checkpoints at the same iteration and exits.
    """

    def __init__(self, target: float, window: int) -> None:
        self.target, self.window = target, window
        self.stopped_at: int | None = None
        self.loss: float | None = None

    def __call__(self, job: Job, records: list[dict[str, Any]]) -> None:
        if self.stopped_at is not None:
            return
        losses = [r["lm_loss"] for r in records if "lm_loss" in r]
        if len(losses) < self.window:
            return
        mean = sum(losses[-self.window:]) / self.window
        if mean <= self.target:
            self.stopped_at, self.loss = int(records[-1]["iteration"]), mean
            # torchrun reports its workers' preemption exit (143) as a failure (1).
            job.ok_codes = (0, 1, 143)
            job.signal_workers(signal.SIGUSR1)


def sft_job(cfg: DemoConfig, paths: Paths, stop: LossTarget | None = None) -> Job:
    _fresh(paths.sft_ckpt, paths.logs / "sft")
    dp = cfg.sft_nproc
    flags = ["--model-config", str(paths.model_config),
             "--data-path", f"{paths.sft_prefix}_text_document",
             "--tokenizer-type", "sentencepiece", "--tokenizer-path", str(paths.tokenizer),
             "--split", "100,0,0", "--seq-length", str(cfg.sft_seq_length),
             "--micro-batch-size", str(cfg.sft_global_batch // dp),
             "--global-batch-size", str(cfg.sft_global_batch), "--train-iters", str(cfg.sft_iters),
             "--lr", str(cfg.sft_lr), "--min-lr", str(cfg.sft_min_lr), "--lr-decay-style", "cosine",
             "--lr-warmup-iters", str(min(cfg.sft_warmup, max(cfg.sft_iters - 1, 0))),
             "--weight-decay", "0.01", "--seed", str(cfg.seed), "--save", str(paths.sft_ckpt),
             "--log-dir", str(paths.logs / "sft"), "--log-interval", "1"]
    if dp > 1:
        launcher = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(dp),
                    "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    else:
        launcher = [sys.executable]
    cmd = launcher + ["-m", "sfpo_megatron.cli", "pretrain"] + flags
    name = "SFT warm start" + (f" (until loss <= {stop.target})" if stop is not None else "")
    return Job(name, cmd, paths.logs / "sft.log", paths.logs / "sft" / "metrics.jsonl",
               cfg.sft_iters, watch=stop)


def export_job(cfg: DemoConfig, paths: Paths) -> Job:
    _fresh(paths.hf)
    cmd = [sys.executable, str(REPO / "tools" / "convert_mcore_to_hf.py"), "--load", str(paths.sft_ckpt),
           "--hf-config", str(paths.model_config), "--save", str(paths.hf)]
    return Job("export to HF", cmd, paths.logs / "export.log")


def rl_flags(cfg: DemoConfig, paths: Paths, arm: str, seed: int, out: Path) -> list[str]:
    """`sfpo-megatron rl` flags of one arm (a `cfg.arms` name: "grpo", "sfpo", "grpo-eK+1")."""
    if arm not in cfg.arms:
        raise ValueError(f"arm must be one of {tuple(cfg.arms)}, got {arm!r}")
    method, epochs = cfg.arms[arm]
    task = get_task(cfg.task)
    batch = cfg.rollout_prompts * cfg.samples_per_prompt
    micro = max(1, batch // cfg.mini_batches)
    if task.heldout_fraction > 0:  # the files `prepare` wrote: disjoint questions
        train_data = str(paths.prompts / "train_prompts.jsonl")
        valid_data = str(paths.prompts / "valid_prompts.jsonl")
    else:
        train_data = task.spec(cfg.train_prompts, TRAIN_SEED)
        valid_data = task.spec(cfg.eval_prompts, VALID_SEED)
    return [
        "--model-config", str(paths.model_config), "--tokenizer-path", str(paths.tokenizer),
        "--hf-checkpoint", str(paths.hf),
        "--prompt-data", train_data,
        "--eval-prompt-data", "val=" + valid_data,
        "--n-samples-per-eval-prompt", str(cfg.eval_samples), "--eval-interval", str(cfg.eval_interval),
        "--eval-temperature", "1.0", "--eval-top-p", str(cfg.eval_top_p),
        "--reward-fn", REWARD_FN, "--reward-num-workers", "1",
        "--rollout-batch-size", str(cfg.rollout_prompts), "--n-samples-per-prompt", str(cfg.samples_per_prompt),
        "--num-steps-per-rollout", str(cfg.mini_batches), "--micro-batch-size", str(micro),
        "--rollout-max-response-len", str(cfg.max_response_len), "--rollout-temperature", "1.0",
        "--algorithm", method, "--sfpo-inner-steps", str(cfg.sfpo_inner_steps),
        "--sfpo-alpha", str(cfg.sfpo_alpha), "--sfpo-zscore-window", str(cfg.sfpo_window),
        "--sfpo-zscore-threshold", str(cfg.sfpo_threshold), "--ppo-epochs", str(epochs),
        "--num-rollouts", str(cfg.rl_steps), "--lr", str(cfg.rl_lr),
        "--lr-warmup-iters", str(cfg.rl_warmup), "--seed", str(seed),
        "--log-dir", str(out / "logs"),  # no --seq-length: rl pads to each batch
        *cfg.extra_rl_flags,
    ]


def rl_job(cfg: DemoConfig, paths: Paths, arm: str, seed: int, tag: str = "") -> Job:
    name = f"{arm}{tag}"
    out = paths.rl(name)
    _fresh(out)
    cmd = [sys.executable, "-m", "sfpo_megatron.cli", "rl"] + rl_flags(cfg, paths, arm, seed, out)
    return Job(f"RL {arm.upper()}{tag}", cmd, paths.logs / f"rl_{name}.log",
               out / "logs" / "metrics.jsonl", cfg.rl_steps)


def rl_metrics(cfg: DemoConfig, paths: Paths, tag: str = "") -> dict[str, Path]:
    """{arm: its metrics.jsonl} of the runs `run_rl_arms(..., tag)` writes."""
    return {arm: paths.rl(f"{arm}{tag}") / "logs" / "metrics.jsonl" for arm in cfg.arms}


def run_rl_arms(cfg: DemoConfig, paths: Paths, seed: int, timer: Timer, tag: str = "",
                show_progress: bool = True) -> dict[str, Path]:
    """Every arm from the same warm start and seed; returns {arm: metrics.jsonl}."""
    jobs = {arm: rl_job(cfg, paths, arm, seed, tag) for arm in cfg.arms}
    if cfg.side_by_side:
        timer.run(f"rl{tag}", run_jobs, list(jobs.values()), show_progress)
    else:
        for arm, job in jobs.items():
            timer.run(f"rl_{arm}{tag}", run_jobs, [job], show_progress)
    return {arm: job.metrics for arm, job in jobs.items()}


def warm_start(cfg: DemoConfig, paths: Paths, timer: Timer, show_progress: bool = True) -> dict[str, Any]:
    """Phases 1-4; returns the task summary."""
    paths.logs.mkdir(parents=True, exist_ok=True)
    summary = timer.run("prepare", prepare, cfg, paths)
    timer.run("preprocess", run_jobs, [preprocess_job(cfg, paths)], False)
    task = get_task(cfg.task)
    stop = LossTarget(task.sft_target_loss, cfg.sft_loss_window) if cfg.sft_stop_at_target else None
    job = sft_job(cfg, paths, stop)
    timer.run("sft", run_jobs, [job], show_progress)
    tracker = paths.sft_ckpt / "latest_checkpointed_iteration.txt"
    if not tracker.exists():
        raise DemoError(f"the SFT run left no checkpoint in {paths.sft_ckpt}: see {job.log}")
    iteration = int(tracker.read_text().strip())
    losses = [r["lm_loss"] for r in job.records() if "lm_loss" in r][:iteration]
    window = losses[-cfg.sft_loss_window:]
    summary.update(sft_iterations=iteration, sft_loss=sum(window) / len(window),
                   sft_stopped_at_target=stop is not None and stop.stopped_at is not None,
                   sft_target_loss=task.sft_target_loss if stop is not None else None)
    timer.run("export", run_jobs, [export_job(cfg, paths)], False)
    return summary


