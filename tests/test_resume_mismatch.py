"""Resuming an RL run with other prompt data (or another seed) fails as one clear error naming the
flag and both values, not a ValueError traceback from the sampler.

The real ``PromptSampler`` carries the state; the slow case runs the real ``sfpo-megatron rl``
(with its CPU rollout server): one step saved, then the same command with more prompts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from launch import PYTHON, REPO, SCRIPTS, SERVER_ENV, child_env, run
from tiny_models import save_rollout_model

from sfpo_megatron.data.prompts import PromptSampler
from sfpo_megatron.errors import UserError
from sfpo_megatron.rl.state import restore_sampler

ARGS = argparse.Namespace(prompt_data="prompts.jsonl")


def _saved_state(n: int = 9, seed: int = 11) -> dict:
    sampler = PromptSampler(list(range(n)), batch_size=2, seed=seed)
    sampler.next_batch()
    return sampler.state_dict()


def test_other_prompt_data_size_names_both_sizes():
    with pytest.raises(UserError) as err:
        restore_sampler(PromptSampler(list(range(5)), batch_size=2, seed=11), _saved_state(), ARGS)
    assert str(err.value) == (
        "--prompt-data prompts.jsonl has 5 prompts but the checkpoint being resumed sampled from 9: "
        "its prompt order and position do not carry over; resume with the same --prompt-data, or "
        "start a new run (another --save) from its weights with --load CKPT --finetune")


def test_other_seed_names_both_seeds():
    with pytest.raises(UserError) as err:
        restore_sampler(PromptSampler(list(range(9)), batch_size=2, seed=12), _saved_state(), ARGS)
    assert str(err.value) == ("--seed 12 differs from the checkpoint's 11: its prompt order does not "
                              "carry over; resume with the same --seed")


def test_same_data_continues_the_stream():
    saved = PromptSampler(list(range(9)), batch_size=2, seed=11)
    saved.next_batch()
    resumed = PromptSampler(list(range(9)), batch_size=2, seed=11)
    restore_sampler(resumed, saved.state_dict(), ARGS)
    assert [resumed.next_batch() for _ in range(6)] == [saved.next_batch() for _ in range(6)]


@pytest.mark.slow  # one RL step with a CPU rollout server, then a second start: ~1 min on 2 cores
def test_rl_resume_with_more_prompts(tmp_path: Path):
    model = save_rollout_model(tmp_path / "model")
    data = tmp_path / "prompts.jsonl"

    def write_prompts(n: int) -> None:
        data.write_text("".join(json.dumps({"prompt": f"one two {i}", "answer": "x"}) + "\n" for i in range(n)))

    cmd = [PYTHON, "-m", "sfpo_megatron.cli", "rl", "--model-config", str(model), "--hf-checkpoint", str(model),
           "--prompt-data", str(data), "--no-chat-template", "--reward-fn", "rl_test_rewards:has_letter_o",
           "--rollout-batch-size", "2", "--n-samples-per-prompt", "2", "--rollout-max-response-len", "4",
           "--micro-batch-size", "4", "--save", str(tmp_path / "ckpt"), "--save-interval", "1",
           "--log-dir", str(tmp_path / "logs")]
    env = child_env(PYTHONPATH=f"{REPO}:{SCRIPTS}", **SERVER_ENV)
    write_prompts(4)
    run(cmd + ["--num-rollouts", "1"], timeout=600, env=env)
    write_prompts(6)
    proc = run(cmd + ["--num-rollouts", "2"], timeout=600, env=env, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        f"sfpo-megatron rl: error: --prompt-data {data} has 6 prompts but the checkpoint being resumed "
        "sampled from 4: its prompt order and position do not carry over; resume with the same "
        "--prompt-data, or start a new run (another --save) from its weights with --load CKPT --finetune"]
    # The refused start changed nothing: the step-1 checkpoint is still the newest.
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "1"
