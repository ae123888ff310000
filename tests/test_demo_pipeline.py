"""`python -m sfpo_megatron.demo --quick`: every phase really runs (torchrun SFT, HF export,
GRPO, GRPO with K+1 passes and SFPO through the CPU rollout server) and the outputs hang together.
A few minutes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launch import PYTHON, read_jsonl, run


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = run([PYTHON, "-m", "sfpo_megatron.demo", "--quick", "--out", str(out), "--no-progress"],
               timeout=900)
    assert "rollouts to reach GRPO's best" in proc.stdout
    assert "rollouts to reach GRPO-E4's best" in proc.stdout
    assert "one seed: point values, no confidence intervals" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    cfg = results["config"]
    per_step = cfg["rollout_prompts"] * cfg["samples_per_prompt"]

    # SFT warm start: the torchrun run logged every iteration and its loss went down.
    sft = read_jsonl(out / "logs" / "sft" / "metrics.jsonl")
    assert [r["iteration"] for r in sft] == list(range(1, cfg["sft_iters"] + 1))
    assert sft[-1]["lm_loss"] < sft[0]["lm_loss"] - 1.0

    # The HF export is a loadable Qwen2 model whose vocabulary is the tokenizer's.
    from transformers import AutoModelForCausalLM

    from sfpo_megatron.data.tokenizer import load_tokenizer

    tok = load_tokenizer(out / "data" / "tokenizer.model")
    model = AutoModelForCausalLM.from_pretrained(out / "warm_start_hf")
    assert model.config.model_type == "qwen2" and model.config.vocab_size == tok.vocab_size
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode("User: Calculate 1 + 2.\nAssistant:")])).logits
    assert torch.isfinite(logits).all()

    # The three RL arms: same warm start and seed, so the same step-0 evaluation; every step counted.
    arms = ("grpo", "grpo-e4", "sfpo")
    curves = results["curves"]
    assert list(curves) == list(arms)
    for arm in arms:
        c = curves[arm]
        assert c["steps"] == list(range(0, cfg["rl_steps"] + 1, cfg["eval_interval"]))
        assert c["rollouts"] == [s * per_step for s in c["steps"]]
        assert all(0.0 <= a <= 1.0 for a in c["accuracy"])
    # (the CPU server's sampling is seeded per request; batching may round a logit differently)
    for arm in ("grpo-e4", "sfpo"):
        assert curves["grpo"]["accuracy"][0] == pytest.approx(curves[arm]["accuracy"][0], abs=0.05)
    rl = {arm: read_jsonl(out / f"rl_{arm}" / "logs" / "metrics.jsonl") for arm in arms}
    steps = {arm: [r for r in rl[arm] if "actor/passes" in r] for arm in arms}
    assert all(len(v) == cfg["rl_steps"] for v in steps.values())
    # GRPO: 1 pass, no reposition; GRPO-E4: SFPO's 4 passes, no reposition; SFPO: 3 fast + 1 slow
    assert [r["actor/passes"] for r in steps["grpo"]] == [1.0] * cfg["rl_steps"]
    assert [r["actor/passes"] for r in steps["grpo-e4"]] == [4.0] * cfg["rl_steps"]
    assert [r["sfpo/alpha"] for arm in ("grpo", "grpo-e4") for r in steps[arm]] == [0.0] * (2 * cfg["rl_steps"])
    assert steps["sfpo"][0]["sfpo/alpha"] == pytest.approx(0.8)
    assert (steps["sfpo"][0]["sfpo/inner_steps"], steps["sfpo"][0]["actor/passes"]) == (3, 4.0)

    comparisons = results["comparisons"]
    assert list(comparisons) == ["grpo", "grpo-e4"]
    for control, c in comparisons.items():
        assert c["control"] == control and c["control_best"] == max(curves[control]["accuracy"])
        assert c["sfpo_best"] == max(curves["sfpo"]["accuracy"])
    assert (out / "sfpo_vs_grpo.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "table.txt").read_text().splitlines()
    assert table[0].split() == ["step", "rollouts", "GRPO", "acc", "%", "GRPO-E4", "acc", "%", "SFPO", "acc", "%"]
    assert "SFPO vs GRPO-E4 (4 vs 4 optimizer passes per rollout batch, the same optimizer steps):" in table
    assert set(results["timings"]) == {"prepare", "preprocess", "sft", "export", "rl"}
