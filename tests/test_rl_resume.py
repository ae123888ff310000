"""Kill-and-resume of `sfpo-megatron rl`: SIGKILL in the middle of a step, restart with the same
command, and the metrics equal an uninterrupted run's bit for bit.

Real processes: the trainer (`python -m sfpo_megatron.cli rl`), the CPU rollout server it starts,
and the reward workers. Rollouts are deterministic (`--rollout-deterministic`: per-request seeds
from (seed, step, round, prompt, sample); the server decodes each sequence alone), so a resumed
run regenerates exactly the samples the uninterrupted one drew. The run uses SFPO with a short
entropy window (the controller's state crosses the checkpoint), dynamic sampling (the sampler's
position does), a raising reward (the error counters do) and evaluation after the restart.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from launch import PYTHON, REPO, SCRIPTS, SERVER_ENV, child_env, read_jsonl, run
from tiny_models import save_rollout_model

ENV = child_env(PYTHONPATH=f"{REPO}:{SCRIPTS}", **SERVER_ENV)
STEPS = 4
KILL_AFTER = 2  # checkpoints every 2 steps: killed during step 3, resumed from step 2
VOLATILE = ("time/", "memory/", "refit/time_s", "refit/gb_per_s", "refit/commit_s", "refit/stage",
            "refit/slowest_stage")

PROMPTS = [{"prompt": p, "answer": "x"} for p in (
    "one two three", "the quick brown", "jumps over the", "eight nine", "lazy dog", "four five six",
    "seven eight", "brown fox")] + [{"prompt": "five six", "answer": "x", "explode": True}]


def command(model: Path, data: Path, out: Path) -> list[str]:
    return [PYTHON, "-m", "sfpo_megatron.cli", "rl", "--model-config", str(model), "--hf-checkpoint", str(model),
            "--prompt-data", str(data), "--no-chat-template", "--reward-fn", "rl_test_rewards:has_letter_o",
            "--reward-num-workers", "1", "--reward-timeout", "30", "--rollout-batch-size", "2",
            "--n-samples-per-prompt", "4", "--rollout-max-response-len", "6", "--dynamic-sampling",
            "--max-resample-rounds", "2", "--num-rollouts", str(STEPS), "--micro-batch-size", "4",
            "--lr", "2e-3", "--sfpo-inner-steps", "2", "--sfpo-zscore-window", "2",
            "--sfpo-zscore-threshold", "0.5", "--seed", "11",
            "--rollout-deterministic", "--weight-transport", "distributed",
            "--eval-prompt-data", f"val={data}", "--eval-interval", "2", "--n-samples-per-eval-prompt", "2",
            "--save", str(out / "ckpt"), "--save-interval", str(KILL_AFTER), "--log-dir", str(out / "logs")]


def stable(records: list[dict]) -> dict[int, dict]:
    return {r["iteration"]: {k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in records}


pytestmark = pytest.mark.slow  # three trainer runs: ~80 s of CPU, 3-6 min wall on 2 shared cores


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("rl_resume")
    model = save_rollout_model(root / "model", seed=2)
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))

    run(command(model, data, root / "reference"), timeout=900, env=ENV)

    out = root / "killed"
    proc = subprocess.Popen(command(model, data, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=ENV)
    tracker = out / "ckpt" / "latest_checkpointed_iteration.txt"
    deadline = time.monotonic() + 600
    while not (tracker.exists() and tracker.read_text() == str(KILL_AFTER)):
        assert proc.poll() is None, f"run ended (code {proc.returncode}) before its step-{KILL_AFTER} checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.05)
    # Into step 3: its rollout batch is logged (rollout_batches.jsonl, written before the update),
    # its metrics are not (written after the update, the refit and the evaluation).
    batches = out / "logs" / "rollout_batches.jsonl"
    while not (batches.exists() and any(json.loads(line)["step"] == KILL_AFTER + 1
                                        for line in batches.read_text().splitlines() if line.endswith("}"))):
        assert proc.poll() is None, f"run ended (code {proc.returncode}) before step {KILL_AFTER + 1}"
        assert time.monotonic() < deadline, "step 3 did not start within 10 minutes"
        time.sleep(0.01)
    children = psutil.Process(proc.pid).children(recursive=True)
    server = [c for c in children if "sfpo_megatron.cpu_server.server" in " ".join(c.cmdline())]
    proc.kill()
    proc.wait(timeout=60)
    logged_at_kill = [r["iteration"] for r in read_jsonl(out / "logs" / "metrics.jsonl")]
    # The rollout server dies with its trainer (parent-death signal): nothing is left behind.
    gone, alive = psutil.wait_procs(server, timeout=30)
    for p in psutil.wait_procs(children, timeout=10)[1]:
        p.kill()  # reward / checkpoint helpers that outlive the test would only leak
    checkpoints_after_kill = sorted(p.name for p in (out / "ckpt").iterdir() if p.name.startswith("iter_"))

    run(command(model, data, out), timeout=900, env=ENV)  # the same command line resumes
    return {"reference": read_jsonl(root / "reference" / "logs" / "metrics.jsonl"),
            "resumed": read_jsonl(out / "logs" / "metrics.jsonl"), "logged_at_kill": logged_at_kill,
            "server": (len(server), len(alive)), "checkpoints_after_kill": checkpoints_after_kill, "out": out}


def test_killed_in_the_middle_of_a_step(runs: dict) -> None:
    assert runs["logged_at_kill"] == [0, 1, 2]  # step 3 had started (not logged, not saved)
    assert runs["checkpoints_after_kill"][-1] == f"iter_{KILL_AFTER:07d}"
    assert runs["server"] == (1, 0)  # one server, not alive after the kill


def test_no_checkpoint_is_corrupted(runs: dict) -> None:
    from sfpo_megatron.components.checkpoint import read_tracker, validate_checkpoint_dir

    ckpt = runs["out"] / "ckpt"
    assert read_tracker(str(ckpt)) == STEPS
    for it in (KILL_AFTER, STEPS):
        validate_checkpoint_dir(str(ckpt / f"iter_{it:07d}"))
    assert not [p for p in ckpt.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.flags("--rollout-deterministic", "--save", "--save-interval", "--sfpo-zscore-threshold")
def test_resumed_metrics_equal_uninterrupted_run_bitwise(runs: dict) -> None:
    from sfpo_megatron.components.metrics import read_metrics

    ref = stable(runs["reference"])
    resumed = stable(read_metrics(str(runs["out"] / "logs")))
    assert sorted(ref) == sorted(resumed) == list(range(STEPS + 1))
    for it in range(STEPS + 1):
        assert resumed[it] == ref[it], (it, {k: (ref[it].get(k), resumed[it].get(k))
                                             for k in set(ref[it]) | set(resumed[it])
                                             if ref[it].get(k) != resumed[it].get(k)})
    # The resumed steps were really re-run (and trained: the losses move), not copied.
    assert [r["iteration"] for r in runs["resumed"]][-2:] == [3, 4]
    assert ref[STEPS]["weight_version"] == STEPS
    assert ref[3]["actor/pg_loss"] != 0.0 and ref[1]["sfpo/fast_displacement_norm"] > 0
    # The entropy trigger fired before the kill: the resumed run kept GRPO (alpha 0) from its state.
    assert 0 < ref[STEPS]["sfpo/trigger_step"] < 3 and ref[3]["sfpo/alpha"] == ref[4]["sfpo/alpha"] == 0.0
