"""The tool-use demo's pieces (`--task tool-arithmetic`): its SFT text is token for token the
trajectory a multi-turn rollout builds, its markers are single tokens, its reward reads the
answer after the last tool output; and (slow) the whole demo runs end to end in quick mode."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from launch import REPO, child_env

from sfpo_megatron.data.tokenizer import load_tokenizer
from sfpo_megatron.demo.task import (
    TOOL_ARITHMETIC,
    TOOL_CALL,
    TOOL_OUTPUT,
    TOOL_TEMPLATE,
    build_tokenizer,
    final_answer_reward,
    render_prompt,
    tool_sft_corpus,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = tool_sft_corpus(300)
    model = build_tokenizer(texts, tmp_path_factory.mktemp("tool_tok") / "tok", 64, TOOL_CALL + TOOL_OUTPUT)
    return load_tokenizer(model)


def test_items_have_three_digit_terms() -> None:
    entries = TOOL_ARITHMETIC.entries(50, 1)
    terms = [int(t) for e in entries for t in e["metadata"]["expression"].split(" ") if t not in "+-"]
    assert max(abs(t) for t in terms) >= 500 and all(abs(t) < 1000 for t in terms)


def test_sft_text_is_the_trajectory_a_rollout_builds(tokenizer) -> None:
    for e in TOOL_ARITHMETIC.entries(20, 3):
        q, a, expr = e["question"], e["answer"], e["metadata"]["expression"]
        full = render_prompt(q) + f" <code>{expr}</code><output>{a}</output> {a}"
        ids = tokenizer.encode(full)
        # prompt | the call the model generates | the tool output the rollout tokenizes | answer
        parts = [render_prompt(q), f" <code>{expr}</code>", TOOL_TEMPLATE.format(output=a), f" {a}"]
        assert ids == [t for p in parts for t in tokenizer.encode(p)]
    for marker in TOOL_CALL + TOOL_OUTPUT:
        assert len(tokenizer.encode(marker)) == 1, marker  # the call's end stops on its token id


def test_sft_corpus_holds_the_tool_trajectories() -> None:
    e = TOOL_ARITHMETIC.entries(1, 5_000_000)[0]
    assert tool_sft_corpus(1)[0] == (render_prompt(e["question"]) + f" <code>{e['metadata']['expression']}</code>"
                                     f"<output>{e['answer']}</output> {e['answer']}")


@pytest.mark.parametrize("response, score", [
    (" <code>261 - 120</code><output>141</output> 141", 1.0),
    (" <code>261 - 120</code><output>141</output> 142", 0.0),
    (" <code>261 - 120</code><output>141</output>", 0.0),  # no answer after the output
    (" 141", 1.0),  # no tool call: the whole response
    (" <code>1</code><output>1</output> 5 <code>2</code><output>3</output> 141", 1.0),
])
def test_final_answer_reward_reads_what_follows_the_last_output(response, score) -> None:
    assert final_answer_reward(response, "141", {}) == score


@pytest.mark.slow  # SFT, multi-turn RL and four evaluations: 7-10 minutes on 2 busy cores
@pytest.mark.timeout(1500)
def test_tool_demo_quick_runs_every_phase(tmp_path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "sfpo_megatron.demo", "--task", "tool-arithmetic", "--quick",
                           "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=1500,
                          cwd=REPO, env=child_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["accuracy"]) == {"sft", "rl"}
    for policy in ("sft", "rl"):
        assert set(results["accuracy"][policy]) == {"tool", "no_tool"}
        assert "tool_calls" in results["tool_use"][policy] and "turns_mean" in results["tool_use"][policy]
    assert "with the tool" in proc.stdout and "after 2 RL steps" in proc.stdout
    rl = [json.loads(line) for line in (out / "rl_tool" / "logs" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rl if r["iteration"] >= 1]  # iteration 0: the warm start's evaluation
    assert len(steps) == 2 and all("rollout/turns_mean" in r for r in steps)
