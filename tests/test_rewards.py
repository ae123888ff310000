"""Reward functions (math-verify, reasoning-gym, user path) and the parallel RewardRunner."""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from sfpo_megatron.data.prompts import load_prompt_dataset
from sfpo_megatron.data.rewards import (
    RewardFunctionError,
    RewardRunner,
    extract_final_answer,
    math_verify_reward,
    reasoning_gym_reward,
    resolve_reward_fn,
)
from sfpo_megatron.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

# ----------------------------------------------------------------- module-level fns for workers


def scripted_reward(response: str, answer: str, metadata: dict) -> float:
    """Behaves as the response says: raise, hang for 60 s, return NaN, or score 1.0."""
    if response == "raise":
        raise RuntimeError("reward exploded")
    if response == "hang":
        Path(metadata["pid_file"]).write_text(str(os.getpid()))
        time.sleep(60)
    if response == "exit":
        os._exit(3)  # the worker dies without an answer
    if response == "nan":
        return math.nan
    return 1.0


def length_reward(response: str, answer: str, metadata: dict) -> float:
    return float(len(response) == int(answer))


# ----------------------------------------------------------------- math-verify


@pytest.mark.parametrize(
    ("response", "answer", "expected"),
    [
        ("So the result is \\boxed{0.5}.", "\\frac{1}{2}", 1.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("\\boxed{1/2}", "\\frac12", 1.0),
        ("The answer is $\\frac{\\sqrt{2}}{2}$.", "\\frac{1}{\\sqrt{2}}", 1.0),
        ("Answer: 2^{1/2}", "\\sqrt{2}", 1.0),
        ("<answer>\\sqrt 2</answer>", "\\sqrt{2}", 1.0),
        ("**Final answer:** 42", "42", 1.0),
        ("\\boxed{42}", "42", 1.0),
        ("The final answer is 0.75", "so the total is \\boxed{\\frac{3}{4}}", 1.0),  # boxed reference
        ("\\boxed{\\{1,2\\}}", "\\{2, 1\\}", 1.0),
        ("first \\boxed{1}, no wait: \\boxed{2}", "2", 1.0),  # the last \boxed counts
        ("first \\boxed{1}, no wait: \\boxed{2}", "1", 0.0),
        ("\\boxed{0.6}", "\\frac{1}{2}", 0.0),
        ("The answer is 3", "\\sqrt{2}", 0.0),
        ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", 0.0),
        ("I think it is 42", "42", 0.0),  # no final answer marker
        ("\\boxed{yes}", "yes", 1.0),
        ("\\boxed{no}", "yes", 0.0),
    ],
)
def test_math_verify_reward(response: str, answer: str, expected: float) -> None:
    assert math_verify_reward(response, answer) == expected


def test_extract_final_answer() -> None:
    assert extract_final_answer("x \\boxed{\\frac{1}{\\sqrt{2}}} y") == "\\frac{1}{\\sqrt{2}}"
    assert extract_final_answer("<answer> 7 </answer> then <answer>8</answer>") == "8"
    assert extract_final_answer("The answer is 3.\nMore text.\nAnswer: $5$.") == "5"
    assert extract_final_answer("\\boxed{unclosed") is None
    assert extract_final_answer("no marker 12") is None


def test_math_verify_reward_in_threads() -> None:
    # math-verify's own signal-based timeouts would raise outside the main thread.
    cases = [("\\boxed{0.5}", "\\frac12", 1.0), ("Answer: \\sqrt{8}", "2\\sqrt{2}", 1.0), ("\\boxed{3}", "4", 0.0)]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda c: math_verify_reward(c[0], c[1]), cases * 3))
    assert got == [c[2] for c in cases] * 3


# ----------------------------------------------------------------- reasoning-gym


@pytest.fixture(scope="module")
def rg_items(tmp_path_factory: pytest.TempPathFactory) -> list:
    model = train_sentencepiece(["Calculate 0123456789 +-*/()= ."] * 5, 40, tmp_path_factory.mktemp("sp") / "m")
    ds = load_prompt_dataset("rg:basic_arithmetic?size=5&seed=1", SentencePieceTokenizer(model))
    return [ds[i] for i in range(3)]


def test_reasoning_gym_reward(rg_items: list) -> None:
    item = rg_items[0]
    assert item.answer == "-4"  # "Calculate 5 - 3 - 6."
    assert reasoning_gym_reward("<answer>-4</answer>", item.answer, item.metadata) == 1.0
    assert reasoning_gym_reward("thinking... <answer> -4 </answer>", item.answer, item.metadata) == 1.0
    assert reasoning_gym_reward("<answer>4</answer>", item.answer, item.metadata) == 0.0
    assert reasoning_gym_reward("-4", item.answer, item.metadata) == 1.0  # untagged: whole response
    # the task's partial credit is passed through: len("-4") / len("x = -4")
    assert reasoning_gym_reward("<answer>x = -4</answer>", item.answer, item.metadata) == pytest.approx(2 / 6)
    with pytest.raises(RewardFunctionError, match="needs a reasoning-gym item"):
        reasoning_gym_reward("-4", "-4", {"task": "x"})


def test_runner_scores_rg_and_math_in_workers(rg_items: list) -> None:
    responses = [f"<answer>{rg_items[0].answer}</answer>", "<answer>999999</answer>", "\\boxed{0.5}", "\\boxed{2}"]
    answers = [rg_items[0].answer, rg_items[1].answer, "\\frac{1}{2}", "3"]
    metadatas = [rg_items[0].metadata, rg_items[1].metadata, {}, {}]
    with RewardRunner("auto", num_workers=2, timeout_s=30) as runner:
        assert runner.score(responses, answers, metadatas) == [1.0, 0.0, 1.0, 0.0]
        assert runner.stats() == {"calls": 4, "errors": 0, "timeouts": 0}


# ----------------------------------------------------------------- runner failures


def test_runner_counts_raising_and_hanging_functions(tmp_path: Path) -> None:
    pid_file = tmp_path / "hang.pid"
    meta = {"pid_file": str(pid_file)}
    with RewardRunner(f"{__name__}:scripted_reward", num_workers=2, timeout_s=1.0) as runner:
        runner.score(["ok"], ["1"], [meta])  # start the workers outside the timed part
        start = time.monotonic()
        rewards = runner.score(["ok", "raise", "hang", "nan", "exit", "ok"], ["1"] * 6, [meta] * 6)
        elapsed = time.monotonic() - start
        assert rewards == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
        assert (runner.errors, runner.timeouts, runner.calls) == (3, 1, 7)  # raise, NaN, exit; hang
        # Waiting the hang out takes 60 s; replacing the killed and exited workers (spawned
        # processes) takes seconds, more on a loaded machine: 45 s separates the two.
        assert elapsed < 45, f"batch took {elapsed:.1f} s with a 1 s timeout"
        # the worker stuck in sleep(60) was killed, not leaked
        hung_pid = int(pid_file.read_text())
        deadline = time.monotonic() + 10
        while psutil.pid_exists(hung_pid) and psutil.Process(hung_pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, f"hung reward worker {hung_pid} still alive"
            time.sleep(0.1)
        # the pool replaced it and keeps working
        assert runner.score(["ok", "raise"], ["1", "1"], [meta, meta]) == [1.0, 0.0]
        assert runner.stats() == {"calls": 9, "errors": 4, "timeouts": 1}
    with pytest.raises(RuntimeError, match="RewardRunner is closed"):
        runner.score(["ok"], ["1"])


def test_runner_counts_stay_per_call_across_threads(tmp_path: Path) -> None:
    """The asynchronous rollout thread and the evaluation share one runner: each call's
    (errors, timeouts) are its own, whatever the other thread scores meanwhile."""
    import threading

    meta = {"pid_file": str(tmp_path / "unused.pid")}
    results: dict[str, tuple] = {}
    with RewardRunner(f"{__name__}:scripted_reward", num_workers=2, timeout_s=5.0) as runner:

        def call(name: str, responses: list[str]) -> None:
            results[name] = runner.score_counted(responses, ["1"] * len(responses), [meta] * len(responses))

        threads = [threading.Thread(target=call, args=("rollout", ["raise", "ok"] * 20)),
                   threading.Thread(target=call, args=("eval", ["ok", "nan", "ok"] * 10))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results["rollout"] == ([0.0, 1.0] * 20, 20, 0)
        assert results["eval"] == ([1.0, 0.0, 1.0] * 10, 10, 0)
        assert runner.stats() == {"calls": 70, "errors": 30, "timeouts": 0}


def test_resolve_reward_fn() -> None:
    assert resolve_reward_fn("math") is math_verify_reward
    assert resolve_reward_fn("rg") is reasoning_gym_reward
    assert resolve_reward_fn(f"{__name__}:length_reward")("abc", "3", {}) == 1.0
    with pytest.raises(RewardFunctionError, match="neither a built-in .* nor an import path"):
        resolve_reward_fn("no_colon")
    with pytest.raises(RewardFunctionError, match="cannot import 'no_such_pkg_xyz.mod': No module named 'no_such_pkg_xyz'"):
        resolve_reward_fn("no_such_pkg_xyz.mod:fn")
    with pytest.raises(RewardFunctionError, match="'os' has no attribute 'nothing_here'"):
        resolve_reward_fn("os:nothing_here")
    with pytest.raises(RewardFunctionError, match="'os:sep' is not callable"):
        resolve_reward_fn("os:sep")
    with pytest.raises(RewardFunctionError, match="cannot be sent to worker processes"):
        RewardRunner(lambda r, a, m: 1.0, num_workers=1, timeout_s=1)
    with pytest.raises(ValueError, match="timeout_s must be positive, got 0"):
        RewardRunner("math", num_workers=1, timeout_s=0)
