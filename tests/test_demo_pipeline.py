"""`python -m sfpo_megatron.demo --quick`: every phase really runs (torchrun SFT, HF export,
GRPO and SFPO through the CPU rollout server) and the outputs hang together. A few minutes."""

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

    # Both RL runs: same warm start and seed, so the same step-0 evaluation; every step counted.
    curves = results["curves"]
    for method in ("grpo", "sfpo"):
        c = curves[method]
        assert c["steps"] == list(range(0, cfg["rl_steps"] + 1, cfg["eval_interval"]))
        assert c["rollouts"] == [s * per_step for s in c["steps"]]
        assert all(0.0 <= a <= 1.0 for a in c["accuracy"])
    # (the CPU server's sampling is seeded per request; batching may round a logit differently)
    assert curves["grpo"]["accuracy"][0] == pytest.approx(curves["sfpo"]["accuracy"][0], abs=0.05)
    rl = {m: read_jsonl(out / f"rl_{m}" / "logs" / "metrics.jsonl") for m in ("grpo", "sfpo")}
    assert [r["sfpo/alpha"] for r in rl["grpo"] if "sfpo/alpha" in r] == [0.0] * cfg["rl_steps"]
    assert rl["sfpo"][1]["sfpo/alpha"] == pytest.approx(0.8)
    assert rl["sfpo"][1]["sfpo/inner_steps"] == 3

    comparison = results["comparison"]
    assert comparison["grpo_best"] == max(curves["grpo"]["accuracy"])
    assert (out / "sfpo_vs_grpo.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "table.txt").read_text().splitlines()[0].split()[:2] == ["step", "rollouts"]
    assert set(results["timings"]) == {"prepare", "preprocess", "sft", "export", "rl"}
