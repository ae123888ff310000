"""`rl`'s update flags at start-up and end to end: `--ppo-epochs` (GRPO's passes per rollout
batch; refused with SFPO) and `--no-ppo-clip`, refused with more than one optimizer step per
rollout batch unless `--allow-unclipped-multi-step`.

The update itself with these flags (E passes against θ(s,0)'s log-probs, equal bit for bit to
SFPO with α = 1, K = E − 1) is checked in tests/test_sfpo_update.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from launch import PYTHON, REPO, SCRIPTS, SERVER_ENV, child_env, read_jsonl, sfpo
from tiny_models import save_rollout_model

from sfpo_megatron.arguments import build_rl_parser
from sfpo_megatron.cli import main
from sfpo_megatron.errors import UserError
from sfpo_megatron.rl.loop import check_rl_args

ENV = child_env(PYTHONPATH=f"{REPO}:{SCRIPTS}", **SERVER_ENV)

UNCLIPPED = (
    "--no-ppo-clip with {steps} optimizer steps per rollout batch ({how}) has no trust region: "
    "every step after the first is off-policy (its parameters have moved away from the policy that "
    "the samples and old log-probs come from) and, without the clip, nothing bounds the ratio "
    "pi / pi_old it trains on. Take one optimizer step per rollout batch (--num-steps-per-rollout "
    "1, --ppo-epochs 1, --algorithm grpo), drop --no-ppo-clip, or pass --allow-unclipped-multi-step "
    "to run it anyway")


@pytest.mark.flags("--no-ppo-clip")
def test_unclipped_multi_step_is_refused_by_the_console_script(tmp_path: Path) -> None:
    proc = subprocess.run(
        [PYTHON, "-m", "sfpo_megatron.cli", "rl", "--model-config", str(tmp_path), "--prompt-data",
         "p.jsonl", "--algorithm", "grpo", "--no-ppo-clip", "--num-steps-per-rollout", "2"],
        capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = UNCLIPPED.format(steps=2, how="--num-steps-per-rollout 2 x --ppo-epochs 1")
    assert proc.stderr.strip().splitlines()[-1] == f"sfpo-megatron rl: error: {message}"


def _args(flags: list[str]):
    return build_rl_parser().parse_args(["--model-config", "unused", "--prompt-data", "p.jsonl",
                                         *flags])


@pytest.mark.parametrize("flags, steps, how", [
    (["--algorithm", "grpo", "--ppo-epochs", "3"], 3, "--num-steps-per-rollout 1 x --ppo-epochs 3"),
    (["--sfpo-inner-steps", "3"], 4, "--num-steps-per-rollout 1 x SFPO's --sfpo-inner-steps 3 + 1 passes"),
    (["--sfpo-inner-steps", "0", "--num-steps-per-rollout", "2"], 2,
     "--num-steps-per-rollout 2 x 1 pass"),
])
@pytest.mark.flags("--no-ppo-clip", "--allow-unclipped-multi-step")
def test_unclipped_multi_step_refusal_and_override(flags, steps, how,
                                                   capsys: pytest.CaptureFixture) -> None:
    args = _args(["--no-ppo-clip", *flags])
    with pytest.raises(UserError) as e:
        check_rl_args(args)
    assert str(e.value) == UNCLIPPED.format(steps=steps, how=how)
    assert main(["rl", "--model-config", "unused", "--prompt-data", "p.jsonl", "--no-ppo-clip",
                 *flags]) == 2
    assert capsys.readouterr().err.strip().endswith("--allow-unclipped-multi-step to run it anyway")
    check_rl_args(_args(["--no-ppo-clip", "--allow-unclipped-multi-step", *flags]))  # passes
    check_rl_args(_args(flags))  # with the clip, several steps are fine


@pytest.mark.parametrize("flags", [
    ["--algorithm", "grpo"],  # VCPO's reference: one step per batch, no clip
    ["--sfpo-alpha", "0"],  # SFPO off from the start: one pass
])
def test_unclipped_single_step_needs_no_override(flags) -> None:
    check_rl_args(_args(["--no-ppo-clip", *flags]))


@pytest.mark.flags("--ppo-epochs")
def test_ppo_epochs_with_sfpo_or_below_one_is_refused(capsys: pytest.CaptureFixture) -> None:
    base = ["rl", "--model-config", "unused", "--prompt-data", "p.jsonl"]
    assert main(base + ["--ppo-epochs", "4"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "sfpo-megatron rl: error: --ppo-epochs 4 sets GRPO's passes over a rollout batch; "
        "--algorithm sfpo makes its own (--sfpo-inner-steps 3 fast passes + 1 slow pass, 1 pass "
        "once the entropy trigger fired): use --algorithm grpo --ppo-epochs E as SFPO's control, "
        "or --ppo-epochs 1")
    assert main(base + ["--algorithm", "grpo", "--ppo-epochs", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "sfpo-megatron rl: error: --ppo-epochs must be >= 1, got 0"


@pytest.mark.flags("--sfpo-no-slow-pass")
def test_no_slow_pass_needs_sfpo_with_fast_passes(capsys: pytest.CaptureFixture) -> None:
    base = ["rl", "--model-config", "unused", "--prompt-data", "p.jsonl", "--sfpo-no-slow-pass"]
    assert main(base + ["--algorithm", "grpo"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "sfpo-megatron rl: error: --sfpo-no-slow-pass drops SFPO's Stage III: it needs "
        "--algorithm sfpo, got --algorithm grpo")
    assert main(base + ["--sfpo-inner-steps", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "sfpo-megatron rl: error: --sfpo-no-slow-pass needs --sfpo-inner-steps >= 1 (with 0 fast "
        "passes and no slow pass a step would not train)")
    with pytest.raises(UserError) as e:  # K passes of optimizer steps, not K + 1
        check_rl_args(_args(["--sfpo-no-slow-pass", "--no-ppo-clip"]))
    assert str(e.value) == UNCLIPPED.format(
        steps=3, how="--num-steps-per-rollout 1 x SFPO's --sfpo-inner-steps 3 passes, no slow pass")
    check_rl_args(_args(["--sfpo-no-slow-pass"]))


PROMPTS = [{"prompt": "one two three", "answer": "four"}, {"prompt": "the quick brown", "answer": "fox"}]


@pytest.mark.slow  # two rl runs; the update itself is checked in the default tier
@pytest.mark.flags("--ppo-epochs", "--allow-unclipped-multi-step", "--log-dir", "--num-rollouts")
def test_ppo_epochs_and_unclipped_override_end_to_end(tmp_path: Path) -> None:
    """A real one-step GRPO run (CPU rollout server) with 2 PPO epochs of 2 mini-batches and no
    clip: it starts, logs both passes, and no token is ever clipped."""
    model = save_rollout_model(tmp_path / "model", seed=2)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    sfpo(1, "rl", [
        "--model-config", str(model), "--hf-checkpoint", str(model), "--no-chat-template",
        "--prompt-data", str(prompts), "--reward-fn", "rl_test_rewards:has_letter_o",
        "--reward-num-workers", "1", "--rollout-max-response-len", "6", "--seed", "3",
        "--rollout-batch-size", "2", "--n-samples-per-prompt", "2", "--num-steps-per-rollout", "2",
        "--micro-batch-size", "2", "--algorithm", "grpo", "--lr", "1e-2", "--num-rollouts", "1",
        "--ppo-epochs", "2", "--no-ppo-clip", "--allow-unclipped-multi-step", "--entropy-coef", "0.01",
        "--log-dir", str(tmp_path / "logs")], timeout=600, env=ENV)
    (m,) = read_jsonl(tmp_path / "logs" / "metrics.jsonl")
    assert m["actor/passes"] == 2.0 and m["sfpo/alpha"] == 0.0
    for name in ("epoch0", "epoch1"):
        assert m[f"actor/grad_norm/{name}"] > 0 and m[f"actor/pg_clipfrac/{name}"] == 0.0
    assert "actor/grad_norm/slow" not in m
    assert m["actor/grad_norm"] == m["actor/grad_norm/epoch1"]
