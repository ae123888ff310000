"""`--kl-coef` end to end: `--ref-load` builds the frozen reference policy the KL term needs.

The run starts from a tiny HF model and takes its torch_dist conversion as the reference: the
logged KL is 0 while the policy still equals the reference and grows once it has moved. Without
`--ref-load` the command stops before anything starts, naming the flag.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from launch import PYTHON, REPO, SCRIPTS, SERVER_ENV, child_env, read_jsonl, sfpo, torchrun
from tiny_models import save_rollout_model

ENV = child_env(PYTHONPATH=f"{REPO}:{SCRIPTS}", **SERVER_ENV)
PROMPTS = [{"prompt": "one two three", "answer": "four"}, {"prompt": "the quick brown", "answer": "fox"},
           {"prompt": "jumps over the", "answer": "lazy"}, {"prompt": "eight nine", "answer": "ten"}]


def rl_flags(model: Path, root: Path) -> list[str]:
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return ["--model-config", str(model), "--hf-checkpoint", str(model), "--no-chat-template",
            "--prompt-data", str(prompts), "--reward-fn", "rl_test_rewards:has_letter_o",
            "--reward-num-workers", "1", "--rollout-max-response-len", "8", "--seed", "3",
            "--rollout-batch-size", "2", "--n-samples-per-prompt", "4", "--num-steps-per-rollout", "2",
            "--micro-batch-size", "2", "--algorithm", "grpo", "--lr", "1e-2", "--num-rollouts", "2",
            "--log-dir", str(root / "logs")]


@pytest.mark.slow  # a TP=2 rl run with a reference policy
@pytest.mark.flags("--kl-coef", "--ref-load")
def test_kl_penalty_against_the_reference_checkpoint(tmp_path: Path) -> None:
    model = save_rollout_model(tmp_path / "model", seed=2)
    ref = tmp_path / "ref"
    torchrun(1, [str(REPO / "tools" / "convert_hf_to_mcore.py"), "--hf-dir", str(model), "--save", str(ref)],
             timeout=300, env=ENV)
    sfpo(1, "rl", rl_flags(model, tmp_path) + ["--kl-coef", "0.05", "--kl-type", "low_var_kl",
                                              "--ref-load", str(ref)], timeout=600, env=ENV)
    steps = {m["iteration"]: m for m in read_jsonl(tmp_path / "logs" / "metrics.jsonl")}
    assert sorted(steps) == [1, 2]
    # Step 1's first optimizer step starts at the reference (KL 0 there); by step 2 the policy
    # has taken two optimizer steps away from it.
    assert steps[1]["actor/kl"] >= 0.0
    assert steps[2]["actor/kl"] > 0.0
    assert steps[2]["actor/kl"] > steps[1]["actor/kl"]


@pytest.mark.flags("--kl-coef", "--ref-load")
def test_kl_without_ref_load_stops_before_anything_starts(tmp_path: Path) -> None:
    model = save_rollout_model(tmp_path / "model", seed=2)
    start = time.monotonic()
    proc = subprocess.run([PYTHON, "-m", "sfpo_megatron.cli", "rl"] + rl_flags(model, tmp_path)
                          + ["--kl-coef", "0.05"], capture_output=True, text=True, timeout=60, env=ENV)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "sfpo-megatron rl: error: --kl-coef 0.05 needs the frozen reference policy: add --ref-load CKPT_DIR "
        "(e.g. the checkpoint the run starts from)")
    assert not (tmp_path / "logs").exists()  # no step, no server, no log
    assert elapsed < 10, f"took {elapsed:.1f} s to refuse the flags"
