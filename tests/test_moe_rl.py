"""`sfpo-megatron rl` end to end on a tiny random Qwen3-MoE (8 experts, top-2) at EP=2.

A real ``torchrun`` trainer (2 ranks, each holding 4 of the 8 experts of every layer, the
distributed optimizer) starts its own CPU rollout server, which serves the model with
transformers' Qwen3-MoE, and runs 3 SFPO steps. After each update each expert-parallel rank
pushes the experts it holds through its own weight-update group, beside stage 0's leader with
the dense tensors, every HF tensor once (experts one by one):
the train–inference logprob gap of the next step's rollouts (server vs trainer on the same tokens)
stays at float rounding, which holds only if the server got every expert right. The router's load
balance and aux loss are logged every step.
"""

from __future__ import annotations

import json
import math
import re

import pytest
from launch import REPO, SCRIPTS, SERVER_ENV, child_env, read_jsonl, sfpo
from tiny_models import save_moe_rollout_model

ENV = child_env(PYTHONPATH=f"{REPO}:{SCRIPTS}", **SERVER_ENV)
STEPS = 3
PROMPTS = [{"prompt": "one two three", "answer": "four"},
           {"prompt": "the quick brown", "answer": "fox"},
           {"prompt": "jumps over the", "answer": "lazy"},
           {"prompt": "lazy dog", "answer": "the"}]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("moe_rl")
    model = save_moe_rollout_model(root / "model", seed=1)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    flags = [
        "--model-config", str(model), "--hf-checkpoint", str(model), "--no-chat-template",
        "--reward-fn", "rl_test_rewards:has_letter_o", "--reward-num-workers", "1",
        "--rollout-max-response-len", "8", "--seed", "7", "--rollout-deterministic",
        "--expert-model-parallel-size", "2", "--use-distributed-optimizer",
        "--micro-batch-size", "2", "--prompt-data", str(prompts), "--rollout-batch-size", "2",
        "--n-samples-per-prompt", "4", "--num-rollouts", str(STEPS), "--lr", "1e-3",
        "--sfpo-inner-steps", "2", "--weight-transport", "distributed",
        "--log-dir", str(root / "logs")]
    proc = sfpo(2, "rl", flags, timeout=900, env=ENV)
    return {"metrics": {m["iteration"]: m for m in read_jsonl(root / "logs" / "metrics.jsonl")},
            "output": proc.stdout + proc.stderr}


@pytest.mark.slow
def test_rl_at_ep2_refits_every_expert(run: dict) -> None:
    steps = run["metrics"]
    assert sorted(steps) == list(range(1, STEPS + 1))
    for i in range(1, STEPS + 1):
        m = steps[i]
        assert m["weight_version"] == i and m["rollout/weight_version"] == i - 1
        # 2 layers x (4 attention + 2 q/k norms + 2 norms + router + 8 experts x 3) + 3
        assert m["refit/num_tensors"] == 2 * (4 + 2 + 2 + 1 + 8 * 3) + 3
        # Two pushing units: stage 0's leader, and expert-parallel rank 1 with its own experts.
        assert m["refit/num_pushers"] == 2 and m["refit/num_stages"] == 1
        assert m["refit/stage0_gb"] > m["refit/stage0_ep1_gb"] > 0
        # Server and trainer hold the same weights: only float rounding separates them.
        assert m["rollout/train_inference_logprob_gap"] < 1e-4, (i, m)
        assert 1.0 <= m["moe/tokens_per_expert_max_over_mean"] <= 4.0
        assert math.isfinite(m["moe/aux_loss"]) and m["moe/aux_loss"] > 0
    # Rank 1 pushed exactly its 4 of the 8 experts of both layers (4 x 3 projections x 2 layers).
    pushed = re.findall(r"refit stage 0 expert-parallel rank 1 \(global rank 1\): (\d+) tensors \((\S+) \.\.\. (\S+)\)",
                        run["output"])
    assert len(pushed) == STEPS  # one refit per step
    assert all(p == ("24", "model.layers.0.mlp.experts.4.gate_proj.weight", "model.layers.1.mlp.experts.7.down_proj.weight")
               for p in pushed), pushed
