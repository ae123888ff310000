"""SIGTERM to the trainer's whole process group (a Slurm time limit without --signal=B:,
`kill -TERM -PGID`) still ends in a checkpoint and exit 143, and the run resumes from it.

Real processes: `python -m sfpo_megatron.cli rl` as a session leader, its CPU rollout server, its
reward worker and the helpers megatron's checkpoint save starts (the results-queue manager lives
from the first save on). The signal goes to the group right after the step-2 checkpoint, while
step 3 generates: every helper of the group gets it, none may die of it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from launch import PYTHON, REPO, SCRIPTS, SERVER_ENV, child_env, read_jsonl, run
from tiny_models import save_rollout_model

ENV = child_env(PYTHONPATH=f"{REPO}:{SCRIPTS}", **SERVER_ENV)
STEPS = 4
PROMPTS = ["one two three", "the quick brown", "jumps over the", "eight nine", "lazy dog", "four five six"]


def command(model: Path, data: Path, out: Path) -> list[str]:
    return [PYTHON, "-m", "sfpo_megatron.cli", "rl", "--model-config", str(model), "--hf-checkpoint", str(model),
            "--prompt-data", str(data), "--no-chat-template", "--reward-fn", "rl_test_rewards:has_letter_o",
            "--reward-num-workers", "1", "--rollout-batch-size", "2", "--n-samples-per-prompt", "2",
            "--rollout-max-response-len", "8", "--num-rollouts", str(STEPS), "--micro-batch-size", "4",
            "--lr", "1e-3", "--algorithm", "grpo", "--seed", "5", "--rollout-deterministic",
            "--save", str(out / "ckpt"), "--save-interval", "1", "--log-dir", str(out / "logs")]


def sigterm_group_after_checkpoint(cmd: list[str], ckpt: Path, log: Path, ready) -> int:
    """Start ``cmd`` as a session leader, SIGTERM its whole group once the checkpoint tracker
    holds an iteration ``ready`` accepts; its exit code."""
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    try:
        tracker = ckpt / "latest_checkpointed_iteration.txt"
        deadline = time.monotonic() + 300
        while not (tracker.exists() and tracker.read_text().strip() and ready(int(tracker.read_text()))):
            assert proc.poll() is None, f"run ended ({proc.returncode}) before the checkpoint:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGTERM)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow  # two trainer runs: ~35 s of wall time on idle cores, 80 s on busy ones
def test_group_wide_sigterm_checkpoints_exits_143_and_resumes(tmp_path: Path) -> None:
    from sfpo_megatron.components.checkpoint import read_tracker, validate_checkpoint_dir

    model = save_rollout_model(tmp_path / "model", seed=2)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": "x"}) + "\n" for p in PROMPTS))
    out = tmp_path / "run"
    log = tmp_path / "trainer.log"
    rc = sigterm_group_after_checkpoint(command(model, data, out), out / "ckpt", log,
                                        lambda it: it == 2)
    assert rc == 143, log.read_text()[-6000:]
    # Step 3 finished with its rewards scored (the reward worker was not killed) and was saved.
    assert read_tracker(str(out / "ckpt")) == 3
    validate_checkpoint_dir(str(out / "ckpt" / "iter_0000003"))
    logged = {r["iteration"]: r for r in read_jsonl(out / "logs" / "metrics.jsonl")}
    assert sorted(logged) == [1, 2, 3] and logged[3]["rollout/reward_errors"] == 0.0
    assert "preempted after step 3: checkpoint written, exiting with 143" in log.read_text()

    run(command(model, data, out), timeout=300, env=ENV)  # the same command resumes at step 4
    resumed = read_jsonl(out / "logs" / "metrics.jsonl")
    assert [r["iteration"] for r in resumed] == [1, 2, 3, 4]
    assert resumed[-1]["weight_version"] == STEPS and resumed[-1]["rollout/reward_errors"] == 0.0
    assert read_tracker(str(out / "ckpt")) == STEPS


def test_helpers_outlive_a_group_wide_sigterm() -> None:
    """Quick case: the reward worker keeps its process and a manager started inside
    ``deferred()`` keeps answering, while one started outside it (the control) dies."""
    proc = subprocess.Popen([PYTHON, str(SCRIPTS / "group_sigterm_helpers.py")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err
    result = json.loads(out)
    assert result["worker_after"] == result["worker_before"] and result["errors"] == 0
    assert result["shielded_manager"] is True
    assert result["bare_manager"] is False  # the signal did reach the group's helpers


@pytest.mark.slow  # two short pretraining runs
def test_pretrain_group_wide_sigterm_checkpoints_and_resumes(tmp_path: Path) -> None:
    """`pretrain` saves under the same deferral: the group's SIGTERM after its first checkpoint
    (megatron's save helper now lives) ends in a second checkpoint, exit 143, and a resume."""
    from tiny_models import write_tiny_config

    from sfpo_megatron.components.checkpoint import read_tracker, validate_checkpoint_dir

    cfg = write_tiny_config(tmp_path / "model")
    out = tmp_path / "run"
    cmd = [PYTHON, "-m", "sfpo_megatron.cli", "pretrain", "--model-config", str(cfg), "--mock-data",
           "--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "100000",
           "--save", str(out / "ckpt"), "--save-interval", "1", "--log-dir", str(out / "logs")]
    log = tmp_path / "trainer.log"
    rc = sigterm_group_after_checkpoint(cmd, out / "ckpt", log, lambda it: it >= 2)
    assert rc == 143, log.read_text()[-6000:]
    stopped = read_tracker(str(out / "ckpt"))
    validate_checkpoint_dir(str(out / "ckpt" / f"iter_{stopped:07d}"))
    cmd[cmd.index("100000")] = str(stopped + 1)
    run(cmd, timeout=300, env=ENV)
    assert read_tracker(str(out / "ckpt")) == stopped + 1
    assert [r["iteration"] for r in read_jsonl(out / "logs" / "metrics.jsonl")][-1] == stopped + 1
