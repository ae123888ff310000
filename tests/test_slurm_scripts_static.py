"""The job scripts without a cluster: shellcheck, their errors outside Slurm, and the examples' paper
settings (DRY_RUN=1 prints the sbatch commands; the trainer flags are parsed with the real RL parser)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sfpo_megatron.arguments import build_rl_parser
from sfpo_megatron.distributed.parallel import check_layout

REPO = Path(__file__).resolve().parents[1]
SBATCH = sorted((REPO / "slurm").glob("*.sbatch"))
SHELL_FILES = SBATCH + sorted((REPO / "slurm/lib").glob("*.sh")) + sorted((REPO / "examples").glob("*.sh")) \
    + sorted((REPO / ".ci").glob("slurm_*.sh"))

# name: (layers, attention heads, KV heads, response length, alpha, paper GRPO -> SFPO average)
MODELS = {
    "qwen2.5-math-1.5b": (28, 12, 2, 2560, 0.8),
    "qwen2.5-math-7b": (28, 28, 4, 2560, 0.8),
    "deepseek-r1-distill-qwen-1.5b": (28, 12, 2, 6144, 0.8),
    "deepseek-r1-distill-qwen-7b": (28, 28, 4, 6144, 0.8),
    "qwen3-4b-base": (36, 32, 8, 6144, 0.9),
}
EVAL_SETS = ["math500", "aime24", "aime25", "amc", "minerva", "olympiadbench"]


def tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert path, f"{name} not found: install the test extra (pip install -e '.[test]')"
    return path


def test_shell_scripts_pass_shellcheck() -> None:
    proc = subprocess.run([tool("shellcheck"), "-x", *[str(p.relative_to(REPO)) for p in SHELL_FILES]],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(SBATCH) == 5 and {p.name for p in SBATCH} == {
        "rl_sfpo.sbatch", "rl_sfpo_colocated.sbatch", "convert_hf.sbatch", "eval.sbatch", "pretrain.sbatch"}


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_cluster_values_are_variables_at_the_top(script: Path) -> None:
    text = script.read_text()
    active = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert not any(re.match(r"#SBATCH --(partition|account|qos)", line) for line in active)
    top = text[:text.index("source \"$SFPO_ROOT/slurm/lib/launcher.sh\"")]
    for var in ("SFPO_PYTHON", "CONTAINER_IMAGE", "CONTAINER_RUNTIME", "CONTAINER_MOUNTS", "GPUS_PER_NODE",
                "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_IB_HCA"):
        assert f': "${{{var}:=' in top, f"{script.name}: {var} has no default at the top"
    assert "#SBATCH --requeue" in text and "#SBATCH --open-mode=append" in text


def test_scripts_outside_slurm_say_what_is_missing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(REPO / "slurm/rl_sfpo.sbatch")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "set HF_DIR to the HuggingFace model directory" in proc.stderr
    proc = subprocess.run(["bash", str(REPO / "slurm/rl_sfpo.sbatch")], env={**env, "HF_DIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "submit with sbatch" in proc.stderr


def dry_run(script: str, mode: str, tmp_path: Path, **env: str) -> list[list[str]]:
    """The sbatch command lines an example would run, split into words."""
    full = {**os.environ, "DRY_RUN": "1", "DATA_DIR": str(tmp_path / "data"), "HF_DIR": str(tmp_path / "hf"),
            "RUNS_DIR": str(tmp_path / "runs"), **env}
    proc = subprocess.run(["bash", str(REPO / "examples" / script), mode], env=full, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line[len("DRY RUN:"):]) for line in proc.stderr.splitlines()
            if line.startswith("DRY RUN:")]


def split_command(words: list[str]) -> tuple[dict[str, str], list[str], str, list[str]]:
    """env assignments, sbatch options, the job script, the flags after it."""
    assert words[0] == "env"
    i = 1
    envs = {}
    while "=" in words[i] and not words[i].startswith("-"):
        key, _, value = words[i].partition("=")
        envs[key] = value
        i += 1
    assert words[i] == "sbatch"
    j = next(k for k in range(i, len(words)) if words[k].endswith(".sbatch"))
    return envs, [w for w in words[i + 1:j] if w != "--parsable"], words[j], words[j + 1:]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_examples_encode_the_paper_settings(name: str, tmp_path: Path) -> None:
    layers, heads, kv_heads, response_len, alpha = MODELS[name]
    runs = {}
    for mode in ("sfpo", "grpo"):
        train, evaluate = dry_run(f"{name}.sh", mode, tmp_path)
        envs, opts, script, flags = split_command(train)
        assert script.endswith("slurm/rl_sfpo_colocated.sbatch") and opts[:2] == ["-N", "1"]
        assert envs["RUN_DIR"] == str(tmp_path / "runs" / f"{name}-{mode}")
        args = build_rl_parser().parse_args(["--model-config", "unused", *flags])
        runs[mode] = args
        assert args.algorithm == mode
        assert (args.lr, args.lr_decay_style, args.weight_decay, args.clip_grad) == (1e-6, "constant", 0.01, 1.0)
        assert (args.adam_beta1, args.adam_beta2) == (0.9, 0.999)
        assert (args.rollout_batch_size, args.n_samples_per_prompt, args.num_rollouts) == (256, 8, 400)
        assert args.rollout_batch_size // args.num_steps_per_rollout == 64  # PPO mini-batch: 64 prompts
        assert (args.eps_clip, args.entropy_coef, args.kl_coef) == (0.2, 0.001, 0.0)
        assert args.rollout_temperature == 1.0 and args.rollout_max_response_len == response_len
        # The servers' context holds the longest prompt and response (rl pads to each batch).
        context = envs["ROLLOUT_EXTRA_ARGS"].split("--context-length ")[1].split()[0]
        assert int(context) >= response_len + 1536
        assert [spec.split("=")[0] for spec in args.eval_prompt_data] == EVAL_SETS
        assert (args.n_samples_per_eval_prompt, args.eval_temperature, args.eval_top_p) == (4, 1.0, 0.7)
        assert args.reward_fn == "math-reference"  # the reference's scorer, for its Table 1
        # The trainer layout fits one node of 8 GPUs and the model (megatron's own checks).
        dp = check_layout(world_size=8, tp=args.tensor_model_parallel_size, pp=1, num_layers=layers,
                          num_attention_heads=heads, num_query_groups=kv_heads,
                          micro_batch_size=args.micro_batch_size,
                          global_batch_size=args.rollout_batch_size * args.n_samples_per_prompt
                          // args.num_steps_per_rollout)
        assert dp * args.tensor_model_parallel_size == 8
        assert 8 % int(envs["ROLLOUT_TP"]) == 0
        # Evaluation of the final checkpoint once training has succeeded.
        eenvs, eopts, escript, eflags = split_command(evaluate)
        assert escript.endswith("slurm/eval.sbatch") and "--dependency=afterok:DRYRUN1" in eopts
        assert eenvs["CKPT"] == str(tmp_path / "runs" / f"{name}-{mode}" / "checkpoints")
        eargs = build_rl_parser().parse_args(["--model-config", "unused", *eflags])
        assert eargs.eval_prompt_data == args.eval_prompt_data and eargs.n_samples_per_eval_prompt == 4
        assert eargs.reward_fn == "math-reference"
    sfpo, grpo = runs["sfpo"], runs["grpo"]
    assert (sfpo.sfpo_inner_steps, sfpo.sfpo_alpha) == (3, alpha)
    assert (sfpo.sfpo_zscore_window, sfpo.sfpo_zscore_threshold) == (30, 1.0)
    # The GRPO baseline differs only in the algorithm.
    differ = {k for k in vars(sfpo) if getattr(sfpo, k) != getattr(grpo, k)}
    assert differ <= {"algorithm", "sfpo_inner_steps", "sfpo_alpha"} and "algorithm" in differ


def test_example_eval_mode_and_disaggregated_layout(tmp_path: Path) -> None:
    (only,) = dry_run("qwen2.5-math-7b.sh", "eval", tmp_path)
    envs, _, script, flags = split_command(only)
    assert script.endswith("slurm/eval.sbatch") and "CKPT" not in envs and envs["EVAL_TASKS"] == "4"
    args = build_rl_parser().parse_args(["--model-config", "unused", *flags])
    assert args.tensor_model_parallel_size == 4 and args.eval_max_response_len == 2560
    train, _ = dry_run("qwen2.5-math-7b.sh", "sfpo", tmp_path, LAYOUT="disaggregated", SBATCH_OPTS="-p gpu -A me")
    _, opts, script, _ = split_command(train)
    assert script.endswith("slurm/rl_sfpo.sbatch") and opts[:6] == ["-p", "gpu", "-A", "me", "-N", "2"]
    proc = subprocess.run(["bash", str(REPO / "examples/qwen3-4b-base.sh"), "train"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "DRY_RUN": "1"})
    assert proc.returncode == 2 and "usage: bash" in proc.stderr


@pytest.mark.parametrize("mode, algorithm", [("vcpo", "grpo"), ("sfpo-vcpo", "sfpo")])
def test_example_async_vcpo_modes(mode: str, algorithm: str, tmp_path: Path) -> None:
    """The asynchronous modes: disaggregated layout (the servers keep their own GPUs), VCPO's
    objective and settings (arXiv 2602.17616) on top of the paper's batch / LR, MAX_STALENESS."""
    from sfpo_megatron.rl.loop import check_rl_args

    train, _ = dry_run("qwen2.5-math-1.5b.sh", mode, tmp_path, MAX_STALENESS="4")
    envs, opts, script, flags = split_command(train)
    assert script.endswith("slurm/rl_sfpo.sbatch") and opts[:2] == ["-N", "2"]
    args = build_rl_parser().parse_args(["--model-config", "unused", *flags])
    check_rl_args(args)
    assert args.algorithm == algorithm and not args.colocate
    assert (args.async_rollout, args.max_staleness, args.vcpo) == (True, 4, True)
    assert (args.tis_threshold, args.ess_lr_scaling, args.ess_rho_base) == (8.0, "sqrt", 1.0)
    if mode == "vcpo":  # as VCPO's reference: no PPO clip, one optimizer step per rollout batch
        assert args.no_ppo_clip and (args.num_steps_per_rollout, args.ppo_epochs) == (1, 1)
    else:  # SFPO's K+1 passes of 4 mini-batch steps each keep the clip (their trust region)
        assert not args.no_ppo_clip and args.eps_clip == 0.2 and args.num_steps_per_rollout == 4
    assert not args.allow_unclipped_multi_step  # check_rl_args above accepted it without
    assert args.entropy_coef == 0.0 and args.kl_coef == 0.0
    assert (args.loss_agg_mode, args.weight_decay, args.lr, args.clip_grad) == ("seq-mean-token-mean", 0.1, 1e-6, 1.0)
