"""``--async-rollout --async-exact-staleness``: a killed-and-resumed asynchronous run equals an
uninterrupted one — the same final weights, tensor for tensor, and the same per-step metrics.

Real processes: the trainer (`python -m sfpo_megatron.cli rl`), the CPU rollout server it starts
and the reward worker. Rollouts are deterministic (`--rollout-deterministic`: per-request seeds
from (seed, step, round, prompt, sample), each sequence decoded alone), and the exact schedule
generates every batch s with weight version max(0, s − 1 − k), whatever the timing. One run goes
through uninterrupted; a second one with the same command is SIGKILLed in the middle of step 3
(after its step-2 checkpoint, which carries finished-but-untrained batches) and restarted with the
same command.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from ckpt_reader import read_model_tensors
from launch import PYTHON, REPO, SCRIPTS, SERVER_ENV, child_env, read_jsonl, run, sigkill_when
from tiny_models import save_rollout_model

ENV = child_env(PYTHONPATH=f"{REPO}:{SCRIPTS}", **SERVER_ENV)
STEPS = 5
K = 2
KILL_AFTER = 2
# Timings, and the queue length when a batch is taken (how far generation had got: timing).
VOLATILE = ("time/", "memory/", "refit/time_s", "refit/gb_per_s", "refit/commit_s", "refit/stage", "refit/slowest_stage",
            "async/queued_batches")

# Scoring a sample takes 0.3 s (one reward worker): generating a batch is slower than training on
# one, so the default schedule would refit in the middle of batches and start them at versions
# that depend on timing; the exact one must not.
PROMPTS = [{"prompt": p, "answer": "x", "sleep_s": 0.3} for p in (
    "one two three", "the quick brown", "jumps over the", "eight nine", "lazy dog", "four five six",
    "seven eight", "brown fox", "nine ten")]

pytestmark = pytest.mark.slow  # three trainer runs (two at once): about 4 min wall on 2 shared cores


def command(model: Path, data: Path, out: Path) -> list[str]:
    return [PYTHON, "-m", "sfpo_megatron.cli", "rl", "--model-config", str(model), "--hf-checkpoint", str(model),
            "--prompt-data", str(data), "--no-chat-template", "--reward-fn", "rl_test_rewards:has_letter_o",
            "--reward-num-workers", "1", "--reward-timeout", "30", "--rollout-batch-size", "2",
            "--n-samples-per-prompt", "4", "--rollout-max-response-len", "6", "--num-rollouts", str(STEPS),
            "--micro-batch-size", "1", "--lr", "2e-3", "--sfpo-inner-steps", "2", "--seed", "7",
            "--rollout-deterministic", "--weight-transport", "distributed", "--vcpo",
            "--async-rollout", "--max-staleness", str(K), "--async-exact-staleness",
            "--save", str(out / "ckpt"), "--save-interval", str(KILL_AFTER), "--log-dir", str(out / "logs")]


def batches(out: Path) -> dict[int, dict]:
    """The last record of each step (a resumed run re-logs the steps after its checkpoint)."""
    return {r["step"]: r for r in read_jsonl(out / "logs" / "rollout_batches.jsonl")}


def stable(out: Path) -> dict[int, dict]:
    return {r["iteration"]: {k: v for k, v in r.items() if not k.startswith(VOLATILE)}
            for r in read_jsonl(out / "logs" / "metrics.jsonl")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from megatron.core import dist_checkpointing

    root = tmp_path_factory.mktemp("rl_async_exact")
    model = save_rollout_model(root / "model", seed=3)
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))

    # The uninterrupted run goes alongside the killed one: the schedule must not depend on load.
    reference = subprocess.Popen(command(model, data, root / "reference"), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, env=ENV)
    out = root / "killed"
    proc = subprocess.Popen(command(model, data, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=ENV)
    tracker = out / "ckpt" / "latest_checkpointed_iteration.txt"
    log = out / "logs" / "rollout_batches.jsonl"
    # Into step 3: its batch is logged (before the update), the step is not finished.
    sigkill_when(proc, lambda: (tracker.exists() and tracker.read_text() == str(KILL_AFTER) and log.exists()
                                and any(json.loads(line)["step"] == KILL_AFTER + 1
                                        for line in log.read_text().splitlines() if line.endswith("}"))),
                 f"step {KILL_AFTER + 1}", poll_s=0.01)
    logged_at_kill = [r["iteration"] for r in read_jsonl(out / "logs" / "metrics.jsonl")]
    state = dist_checkpointing.load_common_state_dict(
        str(out / "ckpt" / f"iter_{KILL_AFTER:07d}"))["extra_state"]["rl"]

    run(command(model, data, out), timeout=900, env=ENV)  # the same command line resumes
    _, err = reference.communicate(timeout=900)
    assert reference.returncode == 0, err.decode()[-3000:]
    return {"root": root, "out": out, "state": state, "logged_at_kill": logged_at_kill}


def test_killed_in_step_3_with_untrained_batches_in_the_checkpoint(runs: dict) -> None:
    assert runs["logged_at_kill"][-1] == KILL_AFTER
    pending = runs["state"]["async"]["pending"]
    # The refit to version 2 waited for batch 2 + K: batches 3..4 at least were queued.
    assert [p["step"] for p in pending][:K] == list(range(KILL_AFTER + 1, KILL_AFTER + 1 + K))


@pytest.mark.flags("--async-exact-staleness")
def test_every_batch_is_generated_with_exactly_version_s_minus_1_minus_k(runs: dict) -> None:
    for out in (runs["root"] / "reference", runs["out"]):
        recs = batches(out)
        assert sorted(recs) == list(range(1, STEPS + 1))
        for step, rec in recs.items():
            assert rec["trained_weight_version"] == step - 1
            assert set(rec["weight_version"]) == {max(0, step - 1 - K)}, (out.name, step, rec["weight_version"])


def test_resumed_weights_equal_the_uninterrupted_run(runs: dict) -> None:
    ref = read_model_tensors(runs["root"] / "reference" / "ckpt")
    resumed = read_model_tensors(runs["out"] / "ckpt")
    assert sorted(ref) == sorted(resumed) and ref
    differ = [k for k in ref if not torch.equal(ref[k], resumed[k])]
    assert not differ, differ
    # ... and the training really moved them (the comparison is not between two copies of the start).
    start = read_model_tensors(runs["out"] / "ckpt" / f"iter_{KILL_AFTER:07d}")
    assert any(not torch.equal(ref[k], start[k]) for k in ref)


@pytest.mark.flags("--rollout-deterministic", "--async-rollout", "--max-staleness")
def test_resumed_metrics_equal_the_uninterrupted_run(runs: dict) -> None:
    ref = stable(runs["root"] / "reference")
    resumed = stable(runs["out"])
    assert sorted(ref) == sorted(resumed) == list(range(1, STEPS + 1))
    for it in ref:
        assert resumed[it] == ref[it], (it, {k: (ref[it].get(k), resumed[it].get(k))
                                             for k in set(ref[it]) | set(resumed[it])
                                             if ref[it].get(k) != resumed[it].get(k)})
    # The compared metrics carry the loss, rewards, versions and staleness of every step.
    for key in ("actor/pg_loss", "rollout/reward_mean", "weight_version", "async/staleness_max", "vcpo/ess"):
        assert all(key in ref[it] for it in ref), key
    assert [ref[it]["async/staleness_max"] for it in ref] == [float(min(s - 1, K)) for s in ref]
    assert [r["iteration"] for r in read_jsonl(runs["out"] / "logs" / "metrics.jsonl")][-STEPS + KILL_AFTER:] \
        == list(range(KILL_AFTER + 1, STEPS + 1))  # the resumed steps were re-run, not copied
