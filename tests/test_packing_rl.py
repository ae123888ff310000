"""`sfpo-megatron rl --use-dynamic-batch-size --max-tokens-per-gpu 256` end to end (real CPU
rollout server, one trainer process), against the same command without the flags.

Prompts of very different lengths (one ~100 tokens, the rest a few) make the padded layout mostly
padding; packed, the same batch (deterministic rollouts: the same samples in both runs) is
forwarded with almost none, and the update computes the same old log-probs and entropies. Also
the flag errors, before anything starts.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from launch import PYTHON, REPO, SCRIPTS, SERVER_ENV, child_env, read_jsonl, sfpo
from tiny_models import save_rollout_model

ENV = child_env(PYTHONPATH=f"{REPO}:{SCRIPTS}", **SERVER_ENV)
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 11)
PROMPTS = [{"prompt": LONG, "answer": "dog"}, {"prompt": "one two", "answer": "three"},
           {"prompt": "five six", "answer": "seven"}, {"prompt": "eight nine", "answer": "ten"}]


def rl_flags(model: Path, root: Path, name: str) -> list[str]:
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return ["--model-config", str(model), "--hf-checkpoint", str(model), "--no-chat-template",
            "--prompt-data", str(prompts), "--reward-fn", "rl_test_rewards:has_letter_o",
            "--reward-num-workers", "1", "--rollout-max-response-len", "12", "--seed", "3",
            "--rollout-deterministic", "--rollout-batch-size", "4", "--n-samples-per-prompt", "2",
            "--num-steps-per-rollout", "2", "--micro-batch-size", "2", "--sfpo-inner-steps", "1",
            "--lr", "1e-3", "--num-rollouts", "1", "--log-dir", str(root / name)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("packing_rl")
    model = save_rollout_model(root / "model", seed=4)
    out = {}
    packed = ["--use-dynamic-batch-size", "--max-tokens-per-gpu", "256"]
    for name, nproc, extra in (("padded", 1, []), ("packed", 1, packed),
                               ("packed_cp2", 2, packed + ["--context-parallel-size", "2"])):
        sfpo(nproc, "rl", rl_flags(model, root, name) + extra, timeout=600, env=ENV)
        out[name] = read_jsonl(root / name / "metrics.jsonl")[-1]
    out["flags"] = lambda extra: rl_flags(model, root, "refused") + extra
    return out


@pytest.mark.slow
@pytest.mark.flags("--use-dynamic-batch-size", "--max-tokens-per-gpu")
def test_packed_run_forwards_almost_no_padding(runs: dict) -> None:
    padded, packed = runs["padded"], runs["packed"]
    assert padded["batch/real_tokens"] == packed["batch/real_tokens"] > 8 * 12
    assert padded["batch/padding_fraction"] > 0.40, padded["batch/padding_fraction"]
    assert packed["batch/padding_fraction"] < 0.05, packed["batch/padding_fraction"]
    assert packed["batch/padding_tokens"] == pytest.approx(
        packed["batch/padding_fraction"] * (packed["batch/real_tokens"]
                                            + packed["batch/padding_tokens"]))
    # 8 samples, 2 mini-batches of 4: padded micro-batches of 2 rows, two per mini-batch; packed,
    # the mini-batch of short samples fits 256 tokens in one micro-batch.
    assert padded["batch/micro_batches_per_rank"] == 4.0
    assert 2.0 <= packed["batch/micro_batches_per_rank"] < 4.0
    # The same samples, the same old log-probs and entropies at θ0.
    for key in ("actor/entropy_at_theta0", "rollout/train_logprob_abs_diff"):
        assert packed[key] == pytest.approx(padded[key], rel=1e-6), key


def refused(flags: list[str]) -> str:
    proc = subprocess.run([PYTHON, "-m", "sfpo_megatron.cli", "rl"] + flags, capture_output=True,
                          text=True, timeout=60, env=ENV)
    assert proc.returncode == 2, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.flags("--use-dynamic-batch-size", "--max-tokens-per-gpu", "--context-parallel-size")
def test_flag_errors_before_anything_starts(tmp_path: Path) -> None:
    model = save_rollout_model(tmp_path / "model", seed=4)
    flags = rl_flags(model, tmp_path, "refused")
    assert refused(flags + ["--use-dynamic-batch-size"]) == (
        "sfpo-megatron rl: error: --use-dynamic-batch-size needs --max-tokens-per-gpu N >= 1 (the "
        "token budget of a micro-batch), got None")
    assert refused(flags + ["--max-tokens-per-gpu", "64"]) == (
        "sfpo-megatron rl: error: --max-tokens-per-gpu 64 is the budget of "
        "--use-dynamic-batch-size's packed micro-batches: add --use-dynamic-batch-size (or drop "
        "--max-tokens-per-gpu)")
    assert refused(flags + ["--context-parallel-size", "2"]) == (
        "sfpo-megatron rl: error: --context-parallel-size 2 splits packed sequences over ranks: add "
        "--use-dynamic-batch-size --max-tokens-per-gpu N")
    assert refused(flags + ["--context-parallel-size", "3", "--use-dynamic-batch-size",
                            "--max-tokens-per-gpu", "64"]) == (
        "sfpo-megatron rl: error: world size 1 is not a multiple of tensor-model-parallel-size 1 x "
        "pipeline-model-parallel-size 1 x context-parallel-size 3 = 3")
    assert not (tmp_path / "refused").exists()


@pytest.mark.slow
@pytest.mark.flags("--context-parallel-size")
def test_context_parallel_run_matches_the_packed_one(runs: dict) -> None:
    """Two trainer ranks splitting every packed sequence: the same batch, old log-probs and
    entropy as one rank (each sequence padded inside its segment to a multiple of 4 tokens)."""
    packed, cp = runs["packed"], runs["packed_cp2"]
    assert cp["batch/real_tokens"] == packed["batch/real_tokens"]
    for key in ("actor/entropy_at_theta0", "rollout/train_logprob_abs_diff", "actor/pg_loss"):
        assert cp[key] == pytest.approx(packed[key], rel=1e-5, abs=1e-7), key
