"""`sfpo-megatron rl` end to end: a TP=2 trainer (real torchrun) that starts its own CPU rollout
server, on a tiny random Qwen2 with a locally trained BPE tokenizer; and `sfpo-megatron eval` on
the checkpoint it leaves. Also the errors bad flag combinations give before anything starts.

One run covers: prompts with a malformed row skipped and counted, a reward function that raises
on one prompt (scored 0 and counted), dynamic sampling (uniform-reward groups dropped and the
batch refilled), colocated mode (server memory released during training), the weight-version
check of synchronous rollouts, the train–inference logprob gap logged every step, refit,
evaluation at steps 0 and 2, TensorBoard + metrics.jsonl and the checkpoint's RL state.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from launch import REPO, SCRIPTS, SERVER_ENV, child_env, read_jsonl, sfpo
from tiny_models import save_rollout_model

ENV = child_env(PYTHONPATH=f"{REPO}:{SCRIPTS}", **SERVER_ENV)
STEPS = 2
N = 4

PROMPTS = [
    {"prompt": "one two three", "answer": "four"},
    {"prompt": "the quick brown", "answer": "fox"},
    {"prompt": "five six", "answer": "seven", "explode": True},
    {"prompt": "jumps over the", "answer": "lazy"},
    {"prompt": "eight nine", "answer": "ten"},
    {"prompt": "lazy dog", "answer": "the"},
]
EVAL = [{"prompt": "one two", "answer": "three"}, {"prompt": "over the lazy", "answer": "dog"},
        {"prompt": "seven eight", "answer": "nine"}]


def write_jsonl(path: Path, rows: list[dict], malformed_line: str | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    if malformed_line is not None:
        lines.insert(2, malformed_line)
    path.write_text("\n".join(lines) + "\n")
    return path


def common_flags(model: Path, root: Path) -> list[str]:
    return ["--model-config", str(model), "--no-chat-template", "--reward-fn", "rl_test_rewards:has_letter_o",
            "--reward-num-workers", "1", "--reward-timeout", "30", "--rollout-max-response-len", "8",
            "--seed", "7", "--rollout-deterministic", "--n-samples-per-eval-prompt", "2",
            "--eval-prompt-data", f"val={write_jsonl(root / 'val.jsonl', EVAL)}"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("rl_loop")
    model = save_rollout_model(root / "model", seed=1)
    prompts = write_jsonl(root / "prompts.jsonl", PROMPTS, malformed_line='{"prompt": "no answer field"}')
    flags = common_flags(model, root) + [
        "--hf-checkpoint", str(model), "--tensor-model-parallel-size", "2", "--micro-batch-size", "2",
        "--prompt-data", str(prompts), "--skip-malformed", "--rollout-batch-size", "2",
        "--n-samples-per-prompt", str(N), "--dynamic-sampling", "--max-resample-rounds", "3",
        "--num-rollouts", str(STEPS), "--lr", "1e-3", "--sfpo-inner-steps", "2",
        "--eval-interval", "2", "--colocate", "--offload-train", "--weight-transport", "distributed",
        "--save", str(root / "ckpt"), "--save-interval", "2", "--dist-ckpt-optim-sharding", "dp_reshardable",
        "--distributed-timeout-minutes", "7",
        "--log-dir", str(root / "logs"), "--tensorboard-dir", str(root / "tb")]
    proc = sfpo(2, "rl", flags, timeout=900, env=ENV)
    return {"root": root, "model": model, "metrics": read_jsonl(root / "logs" / "metrics.jsonl"),
            "output": proc.stdout + proc.stderr}


@pytest.mark.flags("--distributed-timeout-minutes")
def test_process_group_takes_the_timeout(run: dict) -> None:
    assert "process group: gloo, world size 2, TP 2, PP 1, collective timeout 0:07:00" in run["output"]


@pytest.mark.flags("--offload-train")
def test_offload_train_is_a_logged_no_op_on_cpu(run: dict) -> None:
    # GPU-only (docs/gpu-validation.md); here the run is the same colocated run, told once.
    line = ("--offload-train: no GPU on this machine, the trainer's state already lives in host memory: "
            "nothing to offload")
    assert run["output"].count(line) == 1


def by_iteration(run: dict) -> dict[int, dict]:
    return {m["iteration"]: m for m in run["metrics"]}


@pytest.mark.flags("--rollout-max-response-len", "--skip-malformed", "--num-rollouts", "--log-dir",
                   "--hf-checkpoint")
def test_every_step_logs_the_loop_metrics(run: dict) -> None:
    steps = by_iteration(run)
    assert sorted(steps) == [0, 1, 2]  # step 0: the evaluation before training
    for i in (1, 2):
        m = steps[i]
        for key in ("rollout/reward_mean", "rollout/accuracy", "rollout/response_length_mean",
                    "rollout/reward_errors", "rollout/reward_timeouts", "data/skipped_malformed_rows",
                    "time/rollout_s", "time/update_s", "refit/time_s", "refit/gb_per_s", "sfpo/alpha",
                    "actor/pg_loss", "actor/grad_norm", "rollout/train_inference_logprob_gap"):
            assert key in m and math.isfinite(m[key]), (i, key)
        assert m["weight_version"] == i and m["rollout/weight_version"] == i - 1
        assert 0 < m["rollout/response_length_mean"] <= 8
        assert m["data/skipped_malformed_rows"] == 1
        assert m["sfpo/alpha"] == pytest.approx(0.8)
        assert m["refit/num_tensors"] == 27


@pytest.mark.flags("--tensor-model-parallel-size", "--weight-transport")
def test_train_inference_logprob_gap_is_tiny_in_synchronous_mode(run: dict) -> None:
    # Server and trainer hold the same weights: only float rounding separates their logprobs.
    for i in (1, 2):
        assert by_iteration(run)[i]["rollout/train_inference_logprob_gap"] < 1e-4


@pytest.mark.flags("--reward-fn")
def test_raising_reward_is_counted_and_scored_zero(run: dict) -> None:
    last = by_iteration(run)[STEPS]
    per_step = [by_iteration(run)[i]["rollout/reward_errors"] for i in (1, 2)]
    assert last["rollout/reward_errors_total"] == sum(per_step) > 0
    assert last["rollout/reward_errors_total"] % N == 0  # every sample of the exploding prompt


@pytest.mark.flags("--dynamic-sampling", "--n-samples-per-prompt", "--rollout-batch-size")
def test_dynamic_sampling_keeps_only_groups_with_a_signal(run: dict) -> None:
    for i in (1, 2):
        m = by_iteration(run)[i]
        # Groups whose rewards all agree (e.g. the exploding prompt) are dropped, unless the
        # refill rounds ran out and they pad the batch back to --rollout-batch-size.
        assert m["train_batch/uniform_groups"] == m["rollout/dynamic_padded_groups"]
        # Every generated group was either trained on or dropped.
        assert m["rollout/num_samples"] == N * (2 + m["rollout/dynamic_dropped_groups"]
                                                - m["rollout/dynamic_padded_groups"])
    assert sum(by_iteration(run)[i]["rollout/dynamic_dropped_groups"] for i in (1, 2)) > 0


@pytest.mark.flags("--eval-interval", "--eval-prompt-data", "--n-samples-per-eval-prompt",
                   "--tensorboard-dir")
def test_evaluation_at_start_and_interval(run: dict) -> None:
    steps = by_iteration(run)
    for i in (0, 2):
        assert 0.0 <= steps[i]["eval/val/avg@2"] <= steps[i]["eval/val/pass@2"] <= 1.0
    assert "eval/val/avg@2" not in steps[1]
    assert list((run["root"] / "tb").glob("events.out.tfevents.*"))


@pytest.mark.flags("--save", "--save-interval", "--dist-ckpt-optim-sharding")
def test_checkpoint_holds_the_rl_state(run: dict) -> None:
    from megatron.core import dist_checkpointing

    ckpt = run["root"] / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(STEPS)
    meta = json.loads((ckpt / "iter_0000002" / "sfpo_meta.json").read_text())
    assert meta["optim_sharding"] == "dp_reshardable"
    state = dist_checkpointing.load_common_state_dict(str(ckpt / "iter_0000002"))["extra_state"]["rl"]
    assert state["step"] == STEPS and state["weight_version"] == STEPS
    assert state["sampler"]["dataset_size"] == len(PROMPTS)  # the malformed row is not in it
    assert state["sampler"]["epoch"] * len(PROMPTS) + state["sampler"]["position"] >= 2 * STEPS
    assert state["updater"]["controller"]["last_step"] == STEPS


@pytest.mark.flags("--load", "--log-dir", "--eval-prompt-data", "--rollout-deterministic", cmd="eval")
def test_eval_subcommand_reproduces_the_loops_evaluation(run: dict) -> None:
    """`sfpo-megatron eval --load` (one process, TP=1 from a TP=2 checkpoint) serves the same
    weights with the same seeds, so avg@k / pass@k equal the loop's evaluation at that step."""
    root = run["root"]
    out = sfpo(1, "eval", common_flags(run["model"], root) + ["--load", str(root / "ckpt"),
                                                              "--log-dir", str(root / "eval_logs")],
               timeout=600, env=ENV)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    loop = by_iteration(run)[STEPS]
    assert result["iteration"] == STEPS and result["weight_version"] == STEPS
    for key in ("eval/val/avg@2", "eval/val/pass@2", "eval/val/response_length"):
        assert result[key] == loop[key], key
    assert read_jsonl(root / "eval_logs" / "metrics.jsonl")[0]["eval/val/avg@2"] == loop["eval/val/avg@2"]


@pytest.mark.parametrize("flags, message", [
    (["--dynamic-sampling", "--n-samples-per-prompt", "1"],
     "--dynamic-sampling drops groups whose rewards all agree; with --n-samples-per-prompt 1"),
    (["--rollout-backend", "external"], "--rollout-backend external needs --rollout-urls"),
    (["--rollout-urls", "http://127.0.0.1:1"], "use --rollout-backend external to connect to them"),
    (["--rollout-batch-size", "3", "--n-samples-per-prompt", "1", "--num-steps-per-rollout", "2"],
     "rollout batch of 3 samples (--rollout-batch-size 3 x --n-samples-per-prompt 1) is not divisible by "
     "--num-steps-per-rollout 2"),
    (["--eval-interval", "5"], "--eval-interval 5 needs --eval-prompt-data"),
    (["--save-interval", "5"], "--save-interval 5 needs --save DIR"),
    (["--rollout-temperature", "0"], "--rollout-temperature must be > 0"),
    (["--async-rollout", "--colocate"], "--async-rollout overlaps generation with training, --colocate"),
    (["--async-rollout", "--max-staleness", "-1"], "--max-staleness must be >= 0, got -1"),
    (["--off-policy-baseline", "opob"], "--off-policy-baseline opob is part of VCPO: add --vcpo"),
    (["--offload-train"], "--offload-train frees the trainer's GPU memory for rollout servers that share "
     "its GPUs: add --colocate (disaggregated servers have GPUs of their own)"),
    (["--optimizer-cpu-offload"], "--optimizer-cpu-offload runs megatron-core's HybridDeviceOptimizer "
     "inside the distributed optimizer: add --use-distributed-optimizer"),
    (["--context-parallel-size", "2", "--use-dynamic-batch-size", "--max-tokens-per-gpu", "64", "--vcpo",
      "--off-policy-baseline", "opob", "--opob-grad-norm", "exact"],
     "--context-parallel-size 2: --opob-grad-norm exact takes per-trajectory gradients, which context "
     "parallelism splits over ranks: use --opob-grad-norm logit"),
])
def test_bad_flags_fail_with_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str],
                                           message: str) -> None:
    """The console script's `rl` entry point, in this process: it stops before building anything."""
    from sfpo_megatron.cli import main

    code = main(["rl", "--model-config", str(tmp_path), "--prompt-data", "p.jsonl"] + flags)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("sfpo-megatron rl: error: ") and message in err


def test_eval_needs_a_policy_and_data(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    from sfpo_megatron.cli import main

    assert main(["eval", "--model-config", str(tmp_path), "--load", str(tmp_path)]) == 2
    assert "needs --eval-prompt-data NAME=SPEC" in capsys.readouterr().err
    assert main(["eval", "--model-config", str(tmp_path), "--eval-prompt-data", "x=y.jsonl"]) == 2
    assert "exactly one of --load CKPT_DIR and --hf-checkpoint HF_DIR" in capsys.readouterr().err
