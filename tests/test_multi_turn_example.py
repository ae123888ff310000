"""examples/vcpo-multi-turn.sh (dry run): the rl flags it submits are the VCPO paper's multi-turn
setting — asynchronous rollouts, VCPO, rho_base 0.55 — on multi-turn python tool use, and pass
`rl`'s start-up checks."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
from launch import REPO

from sfpo_megatron.arguments import build_rl_parser
from sfpo_megatron.rl.loop import check_rl_args


def submitted_flags(mode: str, tmp_path: Path) -> list[str]:
    env = {**os.environ, "DRY_RUN": "1", "DATA_DIR": str(tmp_path / "data"), "HF_DIR": str(tmp_path / "hf"),
           "RUNS_DIR": str(tmp_path / "runs")}
    proc = subprocess.run(["bash", str(REPO / "examples" / "vcpo-multi-turn.sh"), mode], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("DRY RUN:")]
    words = shlex.split(line[len("DRY RUN:"):])
    script = next(i for i, w in enumerate(words) if w.endswith(".sbatch"))
    assert words[script].endswith("slurm/rl_sfpo.sbatch") and "-N" in words and words[words.index("-N") + 1] == "2"
    return words[script + 1:]


@pytest.mark.parametrize("mode, algorithm, asynchronous", [("vcpo", "grpo", True), ("sfpo-vcpo", "sfpo", True),
                                                            ("sync", "sfpo", False)])
def test_example_submits_the_multi_turn_vcpo_setting(mode, algorithm, asynchronous, tmp_path):
    args = build_rl_parser().parse_args(["--model-config", "unused", *submitted_flags(mode, tmp_path)])
    check_rl_args(args)
    assert (args.rollout_mode, args.tool, args.max_turns, args.max_total_response_len) == \
        ("multi-turn", "python", 4, 8192)
    assert args.tool_call_format == "json" and "<tool_call>" in args.system_prompt
    assert args.algorithm == algorithm and args.async_rollout == asynchronous and args.vcpo == asynchronous
    assert args.ess_rho_base == (0.55 if asynchronous else 1.0)
    if mode == "vcpo":  # VCPO's reference: no clip, one optimizer step per rollout batch
        assert args.no_ppo_clip and args.num_steps_per_rollout == 1
