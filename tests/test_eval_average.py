"""`sfpo-megatron eval` with two eval sets: `eval/average`, the unweighted mean of the sets' avg@k
(the SFPO paper's "average" column), in the printed metrics, metrics.jsonl and TensorBoard; and
a reward function's `eval_score_floor` (math-reference's 0.95) counting lower scores as 0.

The reward (tests/scripts/rl_test_rewards.py:answer_value) is each row's answer read as a
number, whatever the tiny random model says, so every expected value is known here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launch import REPO, SCRIPTS, SERVER_ENV, child_env, read_jsonl, sfpo
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_models import save_rollout_model

ENV = child_env(PYTHONPATH=f"{REPO}:{SCRIPTS}", **SERVER_ENV)
K = 2
SETS = {  # name → the answers (= scores) of its prompts
    "small": ["1", "1"],
    "large": ["0.96", "0.2", "1", "0.94"],
}
PROMPTS = ["one two", "over the lazy", "seven eight", "lazy dog"]
FLOOR = 0.95


def avg_at_k(scores: list[str]) -> float:
    """Every sample of a prompt scores its answer; below the floor it counts 0."""
    counted = [float(s) if float(s) >= FLOOR else 0.0 for s in scores]
    return sum(counted) / len(counted)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("eval_average")
    model = save_rollout_model(root / "model", seed=1)
    specs = []
    for name, answers in SETS.items():
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n"
                                for p, a in zip(PROMPTS, answers)))
        specs.append(f"{name}={path}")
    out = sfpo(1, "eval", [
        "--model-config", str(model), "--hf-checkpoint", str(model), "--no-chat-template",
        "--reward-fn", "rl_test_rewards:answer_value", "--reward-num-workers", "1",
        "--rollout-max-response-len", "4", "--seed", "7", "--n-samples-per-eval-prompt", str(K),
        "--eval-prompt-data", *specs,
        "--log-dir", str(root / "logs"), "--tensorboard-dir", str(root / "tb")], timeout=600, env=ENV)
    acc = EventAccumulator(str(root / "tb"))
    acc.Reload()
    return {"printed": json.loads(out.stdout.strip().splitlines()[-1]),
            "jsonl": read_jsonl(root / "logs" / "metrics.jsonl"),
            "tb": {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}}


def test_average_is_the_unweighted_mean_of_the_sets_avg_at_k(run: dict) -> None:
    per_set = {name: avg_at_k(answers) for name, answers in SETS.items()}
    average = sum(per_set.values()) / len(per_set)
    # Unweighted: the 4-prompt set does not count twice the 2-prompt one.
    pooled = sum(avg_at_k(a) * len(a) for a in SETS.values()) / sum(len(a) for a in SETS.values())
    assert abs(average - pooled) > 0.01
    printed = run["printed"]
    for name, value in per_set.items():
        assert printed[f"eval/{name}/avg@{K}"] == pytest.approx(value, abs=1e-12)
    assert printed["eval/average"] == pytest.approx(average, abs=1e-12)
    (line,) = run["jsonl"]
    assert line["eval/average"] == printed["eval/average"]
    assert run["tb"]["eval/average"] == [(0, pytest.approx(average, rel=1e-6))]


def test_scores_below_the_functions_floor_count_zero(run: dict) -> None:
    """0.2 and 0.94 count 0; 0.96 and 1 count as they are (without the floor: 3.1 / 4). pass@k
    needs a score of 1."""
    printed = run["printed"]
    assert printed[f"eval/small/avg@{K}"] == 1.0
    assert printed[f"eval/large/avg@{K}"] == pytest.approx((0.96 + 1) / 4)
    assert printed[f"eval/small/pass@{K}"] == 1.0 and printed[f"eval/large/pass@{K}"] == 0.25
