"""The RL loop learns: a TP=2 trainer with one CPU rollout server improves validation reward on a
reasoning-gym task (one-digit a + b / a - b) from a warm start within a bounded number of steps.

The warm start (tests/warm_start.py) is a tiny Qwen2 with a SentencePiece tokenizer, trained on
correct answers from a disjoint reasoning-gym seed until a fifth of its temperature-1 samples are
right. Eight SFPO steps (32 prompts x 8 samples) must then raise validation avg@4 (400 held-out
prompts, temperature 1) by more than three standard errors of the evaluation's own sampling noise
(sqrt(p(1-p) / 4N) per evaluation bounds it for a fixed policy), so a policy that did not move
fails (measured on a 2-core machine: 0.227 → 0.325 against a bound of 3 x 0.016). Fixed seeds
throughout. About a minute on 2 cores: in the slow tier, which CI runs.
"""

from __future__ import annotations

import math

import pytest
import warm_start
from launch import PYTHON, SERVER_ENV, child_env, read_jsonl, run, sfpo

ENV = child_env(**SERVER_ENV)
STEPS = 8
N_VAL = 400


@pytest.mark.slow
def test_sfpo_improves_validation_reward_from_warm_start(tmp_path) -> None:
    model = tmp_path / "warm"
    run([PYTHON, warm_start.__file__, str(model)], timeout=900, env=ENV)
    flags = ["--model-config", str(model), "--hf-checkpoint", str(model),
             "--tokenizer-path", str(model / "tokenizer.model"), "--tensor-model-parallel-size", "2",
             "--prompt-data", warm_start.spec(2000, warm_start.TRAIN_SEED),
             "--eval-prompt-data", f"val={warm_start.spec(N_VAL, warm_start.VALID_SEED)}",
             "--reward-fn", "rg", "--reward-num-workers", "1", "--rollout-batch-size", "32",
             "--n-samples-per-prompt", "8", "--rollout-max-response-len", "6", "--micro-batch-size", "32",
             "--num-rollouts", str(STEPS), "--lr", "1e-3", "--algorithm", "sfpo", "--seed", "3",
             "--eval-interval", str(STEPS), "--n-samples-per-eval-prompt", "4", "--eval-top-p", "1.0",
             "--log-dir", str(tmp_path / "logs")]
    sfpo(2, "rl", flags, timeout=1800, env=ENV)
    metrics = {m["iteration"]: m for m in read_jsonl(tmp_path / "logs" / "metrics.jsonl")}
    start, end = metrics[0]["eval/val/avg@4"], metrics[STEPS]["eval/val/avg@4"]
    assert 0.05 < start < 0.6, start  # a warm start: some answers right, room to improve
    noise = math.sqrt(start * (1 - start) / (4 * N_VAL) + end * (1 - end) / (4 * N_VAL))
    assert end - start > 3 * noise, (start, end, noise)
    assert metrics[STEPS]["eval/val/pass@4"] > metrics[0]["eval/val/pass@4"]
    for i in range(1, STEPS + 1):
        assert metrics[i]["rollout/train_inference_logprob_gap"] < 1e-4
        assert metrics[i]["weight_version"] == i and math.isfinite(metrics[i]["actor/pg_loss"])
