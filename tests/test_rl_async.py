"""Asynchronous rollouts (`--async-rollout --max-staleness 2 --vcpo`) end to end.

Real processes: the trainer (`python -m sfpo_megatron.cli rl`), the CPU rollout server it starts
and the reward worker. The async run is SIGKILLed in the middle of step 3 (after its step-2
checkpoint, which carries finished-but-untrained batches), restarted with the same command, and a
copy of the same checkpoint is also resumed *synchronously*. From ``rollout_batches.jsonl`` (the
prompt, weight version and reward of every trained sample; the last record of a step wins):

* no step trains on a sample more than 2 versions older than the weights it updates, and the
  run really was asynchronous (staleness 2 was reached);
* the prompts trained over steps 1..6 are exactly the sampler's stream — every prompt drawn once,
  in order: the kill lost none and trained none twice (both resumes);
* the batches the checkpoint carried were trained after the restart as they were (same versions),
  not regenerated.

Plus the producer's scheduling rules in-process (real threads, a collect function that records
when it ran), the exact schedule's wait (``--async-exact-staleness``) included; its end-to-end
kill-and-resume equality is tests/test_rl_async_exact.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from launch import PYTHON, REPO, SCRIPTS, SERVER_ENV, child_env, read_jsonl, run, sigkill_when
from tiny_models import save_rollout_model

ENV = child_env(PYTHONPATH=f"{REPO}:{SCRIPTS}", **SERVER_ENV)
STEPS = 6
K = 2
BATCH = 2  # prompts per step
N = 4

PROMPTS = [{"prompt": p, "answer": "x"} for p in (
    "one two three", "the quick brown", "jumps over the", "eight nine", "lazy dog", "four five six",
    "seven eight", "brown fox", "nine ten")]


def command(model: Path, data: Path, out: Path, asynchronous: bool = True) -> list[str]:
    flags = [PYTHON, "-m", "sfpo_megatron.cli", "rl", "--model-config", str(model), "--hf-checkpoint", str(model),
             "--prompt-data", str(data), "--no-chat-template", "--reward-fn", "rl_test_rewards:has_letter_o",
             "--reward-num-workers", "1", "--reward-timeout", "30", "--rollout-batch-size", str(BATCH),
             "--n-samples-per-prompt", str(N), "--rollout-max-response-len", "6", "--num-rollouts", str(STEPS),
             "--micro-batch-size", "1", "--lr", "2e-3", "--sfpo-inner-steps", "2", "--seed", "5",
             "--weight-transport", "distributed", "--vcpo",
             "--save", str(out / "ckpt"), "--save-interval", "2", "--log-dir", str(out / "logs")]
    return flags + (["--async-rollout", "--max-staleness", str(K)] if asynchronous else [])


def batches(out: Path) -> dict[int, dict]:
    """The last record of each step (a resumed run re-logs the steps after its checkpoint)."""
    return {r["step"]: r for r in read_jsonl(out / "logs" / "rollout_batches.jsonl")}


def sampler_stream(num_prompts: int) -> list[int]:
    from sfpo_megatron.data.prompts import PromptSampler

    sampler = PromptSampler(list(range(len(PROMPTS))), BATCH, seed=5)
    return sampler.next_indices(num_prompts)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from megatron.core import dist_checkpointing

    root = tmp_path_factory.mktemp("rl_async")
    model = save_rollout_model(root / "model", seed=3)
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))

    out = root / "async"
    proc = subprocess.Popen(command(model, data, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=ENV)
    tracker = out / "ckpt" / "latest_checkpointed_iteration.txt"
    sigkill_when(proc, lambda: tracker.exists() and tracker.read_text() == "2", "its step-2 checkpoint")
    killed_at = max(batches(out))
    state = dist_checkpointing.load_common_state_dict(str(out / "ckpt" / "iter_0000002"))["extra_state"]["rl"]
    sync_out = root / "sync_resume"
    shutil.copytree(out / "ckpt", sync_out / "ckpt")
    shutil.copytree(out / "logs", sync_out / "logs")

    run(command(model, data, out), timeout=900, env=ENV)  # the same command line resumes
    run(command(model, data, sync_out, asynchronous=False), timeout=900, env=ENV)
    return {"async": batches(out), "sync": batches(sync_out), "state": state, "killed_at": killed_at,
            "metrics": {r["iteration"]: r for r in read_jsonl(out / "logs" / "metrics.jsonl")}}


@pytest.mark.slow  # three trainer runs with a SIGKILL (the in-process schedule tests stay)
def test_killed_after_a_checkpoint_that_carries_untrained_batches(runs: dict) -> None:
    state = runs["state"]
    assert state["step"] == 2 and state["weight_version"] == 2
    pending = state["async"]["pending"]
    assert pending and [p["step"] for p in pending] == list(range(3, 3 + len(pending)))
    assert len(pending) <= K + 1
    assert runs["killed_at"] <= 3  # step 3 had at most started


@pytest.mark.slow  # three trainer runs with a SIGKILL (the in-process schedule tests stay)
@pytest.mark.flags("--async-rollout", "--max-staleness", "--vcpo")
def test_no_sample_is_older_than_max_staleness(runs: dict) -> None:
    seen = set()
    for step, rec in runs["async"].items():
        trained = rec["trained_weight_version"]
        assert trained == step - 1
        lags = [trained - v for v in rec["weight_version"]]
        assert 0 <= min(lags) and max(lags) <= K, (step, rec["weight_version"])
        seen.update(lags)
        m = runs["metrics"][step]
        assert m["async/staleness_max"] == max(lags) and m["async/staleness_min"] == min(lags)
        assert sum(m[f"async/staleness_frac/{j}"] for j in range(K + 1)) == pytest.approx(1.0)
        for key in ("vcpo/ess", "vcpo/rho", "vcpo/lr_scale", "is_weight/max", "is_weight/p90", "lr_effective",
                    "rollout/train_inference_logprob_gap"):
            assert key in m, (step, key)
        assert 0 < m["vcpo/rho"] <= 1 and m["lr_effective"] <= m["lr"]
    assert K in seen  # generation really ran ahead of training


@pytest.mark.slow  # three trainer runs with a SIGKILL (the in-process schedule tests stay)
@pytest.mark.flags("--seed", "--rollout-batch-size", "--prompt-data")
@pytest.mark.parametrize("resume", ["async", "sync"])
def test_kill_and_resume_loses_no_sample_and_trains_none_twice(runs: dict, resume: str) -> None:
    recs = runs[resume]
    assert sorted(recs) == list(range(1, STEPS + 1))
    trained = [i for step in range(1, STEPS + 1) for i in recs[step]["prompt_index"][::N]]
    for step in range(1, STEPS + 1):  # groups: N samples of one prompt each
        idx = recs[step]["prompt_index"]
        assert all(idx[g * N:(g + 1) * N] == [idx[g * N]] * N for g in range(BATCH))
    assert trained == sampler_stream(STEPS * BATCH)


@pytest.mark.slow  # three trainer runs with a SIGKILL (the in-process schedule tests stay)
def test_carried_batches_are_trained_as_they_were(runs: dict) -> None:
    for p in runs["state"]["async"]["pending"]:
        rec = runs["async"][p["step"]]
        assert rec["weight_version"] == [s["weight_version"] for s in p["samples"]]
        assert rec["prompt_index"] == [s["prompt_index"] for s in p["samples"]]
        assert rec["reward"] == [s["reward"] for s in p["samples"]]


# ---- the producer's schedule, in-process ------------------------------------------------------------


class Recorder:
    """A collect function: remembers the servers' version when each batch started."""

    def __init__(self, producer_ref: list) -> None:
        self.started: dict[int, int] = {}
        self.ref = producer_ref
        self.sampler = None

    def __call__(self, step: int):
        from sfpo_megatron.records import RolloutBatch

        self.started[step] = self.ref[0]._version
        self.sampler.next_indices()
        return RolloutBatch(samples=[], metrics={})


def make_producer(k: int, last: int = 10):
    from sfpo_megatron.data.prompts import PromptSampler
    from sfpo_megatron.rollout.async_producer import AsyncRolloutProducer

    ref: list = []
    rec = Recorder(ref)
    rec.sampler = PromptSampler(list(range(5)), 2, seed=0)
    prod = AsyncRolloutProducer(rec, rec.sampler, max_staleness=k, weight_version=0, next_step=1, last_step=last)
    ref.append(prod)
    return prod, rec


def test_producer_waits_for_the_weights_the_staleness_bound_needs() -> None:
    prod, rec = make_producer(k=1)
    prod.start()
    try:
        assert prod.wait_until_blocked(timeout=30) == 1  # batch 3 needs version >= 1
        assert sorted(rec.started) == [1, 2]
        for step in range(1, 6):
            assert prod.get(step).step == step
            prod.weights_updated(step)
        assert all(rec.started[s] >= s - 1 - 1 for s in rec.started)
    finally:
        prod.close()
        prod.join()


def test_producer_state_points_at_the_first_untrained_prompt() -> None:
    prod, rec = make_producer(k=2, last=3)
    prod.start()
    try:
        deadline = time.monotonic() + 10
        while prod.queued() < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        state = prod.state_dict()
        assert [p["step"] for p in state["pending"]] == [1, 2, 3]
        assert state["start_sampler"]["position"] == 0 and state["start_sampler"]["epoch"] == 0
        assert state["resume_sampler"]["position"] == 1 and state["resume_sampler"]["epoch"] == 1  # 6 of 5 drawn
        prod.get(1)
        assert prod.state_dict()["start_sampler"]["position"] == 2
    finally:
        prod.close()
        prod.join()


def test_producer_error_reaches_the_trainer() -> None:
    from sfpo_megatron.rollout.async_producer import AsyncRolloutProducer

    def broken(step: int):
        raise ConnectionError(f"server gone at batch {step}")

    prod = AsyncRolloutProducer(broken, type("S", (), {"state_dict": lambda self: {}})(), max_staleness=1,
                                weight_version=0, next_step=1, last_step=4).start()
    with pytest.raises(ConnectionError, match="server gone at batch 1"):
        prod.get(1)
    prod.close()
    prod.join()
    assert not any(t.name == "async-rollout" and t.is_alive() for t in threading.enumerate())


class GatedRecorder(Recorder):
    """Also remembers the servers' version when each batch finished; batches in ``gates`` wait
    for their event first (a batch still in flight, as long as the test needs)."""

    def __init__(self, producer_ref: list, gates: dict[int, threading.Event]) -> None:
        super().__init__(producer_ref)
        self.finished: dict[int, int] = {}
        self.gates = gates

    def __call__(self, step: int):
        result = super().__call__(step)
        if step in self.gates:
            assert self.gates[step].wait(timeout=30)
        time.sleep(0.002)  # room for a refit to land mid-batch, were the trainer not waiting
        self.finished[step] = self.ref[0]._version
        return result


@pytest.mark.flags("--async-exact-staleness")
@pytest.mark.parametrize("k", [0, 1, 3])
def test_exact_schedule_generates_batch_s_with_version_s_minus_1_minus_k(k: int) -> None:
    from sfpo_megatron.data.prompts import PromptSampler
    from sfpo_megatron.rollout.async_producer import AsyncRolloutProducer

    last = 8
    ref: list = []
    gate = threading.Event()
    rec = GatedRecorder(ref, {k + 2: gate} if k else {})  # with k = 0 the trainer takes each batch itself
    rec.sampler = PromptSampler(list(range(5)), 2, seed=0)
    prod = AsyncRolloutProducer(rec, rec.sampler, max_staleness=k, weight_version=0, next_step=1, last_step=last)
    ref.append(prod)
    prod.start()
    try:
        for step in range(1, last + 1):  # the trainer: take, update, wait, refit
            assert prod.get(step).step == step
            if step == 2 and k:
                # Batch k + 2 (version 1) is held in flight: the refit to version 2 must wait for it.
                assert prod.wait_until_produced(step + k, timeout=0.3) is False
                gate.set()
            assert prod.wait_until_produced(step + k, timeout=30) is True
            prod.weights_updated(step)
        expected = {s: max(0, s - 1 - k) for s in range(1, last + 1)}
        assert rec.started == expected and rec.finished == expected
        assert prod.wait_until_produced(last + k, timeout=0) is True  # the run's last batch bounds it
    finally:
        prod.close()
        prod.join()


def test_exact_wait_ends_when_the_producer_fails_or_stops() -> None:
    from sfpo_megatron.rollout.async_producer import AsyncRolloutProducer

    def broken(step: int):
        raise ConnectionError(f"server gone at batch {step}")

    sampler = type("S", (), {"state_dict": lambda self: {}})()
    prod = AsyncRolloutProducer(broken, sampler, max_staleness=1, weight_version=0, next_step=1,
                                last_step=4).start()
    assert prod.wait_until_produced(2, timeout=30) is False  # returns (the error reaches get())
    with pytest.raises(ConnectionError, match="server gone at batch 1"):
        prod.get(1)
    prod.close()
    prod.join()

    gate = threading.Event()
    stuck = AsyncRolloutProducer(lambda step: gate.wait(30), sampler, max_staleness=1, weight_version=0,
                                 next_step=1, last_step=4).start()
    out: list = []
    waiter = threading.Thread(target=lambda: out.append(stuck.wait_until_produced(1)))
    waiter.start()
    stuck.close()  # a closed producer releases the waiting trainer with its batch unfinished
    waiter.join(timeout=30)
    assert out == [False]
    gate.set()
    stuck.join()


@pytest.mark.flags("--async-exact-staleness")
def test_exact_schedule_without_async_rollout_is_refused(capsys: pytest.CaptureFixture) -> None:
    from sfpo_megatron.arguments import build_rl_parser
    from sfpo_megatron.cli import main
    from sfpo_megatron.rl.loop import check_rl_args

    flags = ["rl", "--model-config", "unused", "--prompt-data", "p.jsonl", "--async-exact-staleness"]
    assert main(flags) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "sfpo-megatron rl: error: --async-exact-staleness fixes the asynchronous schedule: add "
        "--async-rollout (synchronous rollouts always use the current weights)")
    check_rl_args(build_rl_parser().parse_args([*flags[1:], "--async-rollout"]))  # passes
