"""Multi-turn tool-use rollouts against a real CPU rollout server.

The server (``python -m sfpo_megatron.cpu_server.server``) serves the tool model
(tiny_models.save_tool_model): an exact bigram model whose greedy continuation of " lazy" is the
calculator call " quick1+2 fox", and which calls again after every tool output. So the test knows
every trajectory in advance: token ids (the tool's output tokenized by HF's tokenizer here), loss
masks, finish reasons, and each generated token's logprob from the model's logit table. Also:
the trajectory's masks reach the training tensors, the python sandbox's failures are tool
outputs inside a running trajectory, and the multi-turn flags drive ``RolloutWorker`` through
the real parser.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from launch import SCRIPTS, SERVER_ENV
from tiny_models import EOS, TOOL_CALL, TOOL_TEMPLATE, save_tool_model, tool_model_logits
from transformers import AutoTokenizer

from sfpo_megatron.arguments import build_rl_parser
from sfpo_megatron.data.prompts import PromptSampler, dataset_kwargs, load_prompt_dataset
from sfpo_megatron.data.rewards import RewardRunner
from sfpo_megatron.data.tokenizer import load_tokenizer
from sfpo_megatron.records import Sample
from sfpo_megatron.rollout.client import RolloutClient
from sfpo_megatron.rollout.generate import RolloutWorker, generate_groups, sampling_params
from sfpo_megatron.rollout.multi_turn import MultiTurnRollout, ToolCallFormat
from sfpo_megatron.rollout.sglang_launcher import LaunchConfig, RolloutLauncher
from sfpo_megatron.rollout.tools.calculator import Calculator
from sfpo_megatron.rollout.tools.python_sandbox import PythonSandbox
from sfpo_megatron.trainer.train_batch import collate


def letter_o(response: str, answer: str, metadata: dict[str, Any]) -> float:
    return 1.0 if "o" in response else 0.0


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("multi_turn")
    model = save_tool_model(root / "model")
    hf = AutoTokenizer.from_pretrained(model)
    options = {"backend": "cpu", "log_dir": str(root / "logs"), "env": SERVER_ENV, "weight_version": "0"}
    with RolloutLauncher(LaunchConfig(model_path=str(model), **options)) as launched, \
            RewardRunner(f"{__name__}:letter_o", num_workers=1, timeout_s=30) as rewards:
        yield {"rewards": rewards, "model": model, "url": launched.urls[0], "hf": hf, "tokenizer": load_tokenizer(str(model)),
               "logprobs": torch.log_softmax(tool_model_logits(model), dim=-1), "root": root}


def ids(env, text: str) -> list[int]:
    return env["hf"].encode(text, add_special_tokens=False)


def expected_logprobs(env, context: list[int], tokens: list[int]) -> list[float]:
    """Each generated token's logprob under the bigram table, given the token before it."""
    seq = context + tokens
    return [float(env["logprobs"][seq[k - 1], seq[k]]) for k in range(len(context), len(seq))]


def runner(env, tool, *, max_turns: int, max_total_len: int, fmt: ToolCallFormat | None = None):
    fmt = fmt or ToolCallFormat(*TOOL_CALL, json=False, response_template=TOOL_TEMPLATE)
    return MultiTurnRollout(RolloutClient([env["url"]]), env["tokenizer"], tool, fmt, max_turns=max_turns,
                            max_total_len=max_total_len)


GREEDY = sampling_params(32, 1.0, 1.0, 1, [EOS])


def test_three_turns_token_ids_masks_and_logprobs_are_exact(env):
    prompt = ids(env, " lazy")
    traj = runner(env, Calculator(), max_turns=3, max_total_len=64).trajectory(prompt, GREEDY, seed=7)
    call, obs = ids(env, " quick1+2 fox"), ids(env, " jumps3 over")
    assert len(call) == 5 and len(obs) == 3
    assert traj.output_ids == call + obs + call + obs + call
    assert traj.loss_mask == [1] * 5 + [0] * 3 + [1] * 5 + [0] * 3 + [1] * 5
    assert traj.finish_reason == "max_turns"  # the third turn's call is not run
    assert (traj.turns, traj.tool_calls, traj.tool_errors, traj.tool_tokens) == (3, 2, 0, 6)
    assert traj.weight_versions == ["0", "0", "0"] and traj.weight_version == "0"
    # Generated tokens: the server's logprobs, each given the whole context (tool output included).
    want = []
    for k in range(3):
        start = k * 8
        want += expected_logprobs(env, prompt + traj.output_ids[:start], call)
        want += [0.0] * (3 if k < 2 else 0)
    assert traj.output_logprobs == pytest.approx(want, abs=1e-5)
    assert all(lp == 0.0 for lp, m in zip(traj.output_logprobs, traj.loss_mask) if m == 0)


def test_a_marker_of_several_tokens_stops_on_the_stop_string(env):
    """End marker "+2 fox" (three tokens): the server stops on the string; the body is "1"."""
    fmt = ToolCallFormat(TOOL_CALL[0], "+2 fox", json=False, response_template=TOOL_TEMPLATE)
    traj = runner(env, Calculator(), max_turns=2, max_total_len=64, fmt=fmt).trajectory(
        ids(env, " lazy"), GREEDY, seed=1)
    call = ids(env, " quick1+2 fox")
    assert traj.output_ids == call + ids(env, " jumps1 over") + call
    assert traj.responses[0].finish_reason == {"type": "stop", "matched": "+2 fox"}
    assert (traj.tool_calls, traj.tool_errors, traj.finish_reason) == (1, 0, "max_turns")


def test_eos_ends_a_trajectory_without_a_call(env):
    traj = runner(env, Calculator(), max_turns=3, max_total_len=64).trajectory(ids(env, " dog"), GREEDY, seed=1)
    assert traj.output_ids == [EOS] and traj.loss_mask == [1]
    assert (traj.finish_reason, traj.turns, traj.tool_calls) == ("stop", 1, 0)


@pytest.mark.parametrize("limit, reason", [(7, "length"), (3, "length"), (13, "length")])
def test_the_total_length_cuts_generated_and_tool_tokens(env, limit, reason):
    call, obs = ids(env, " quick1+2 fox"), ids(env, " jumps3 over")
    traj = runner(env, Calculator(), max_turns=5, max_total_len=limit).trajectory(ids(env, " lazy"), GREEDY, seed=1)
    full = call + obs + call + obs
    assert traj.output_ids == full[:limit] and traj.finish_reason == reason
    assert traj.loss_mask == ([1] * 5 + [0] * 3 + [1] * 5 + [0] * 3)[:limit]


def test_a_bad_call_is_a_tool_error_the_model_reads(env):
    fmt = ToolCallFormat(*TOOL_CALL, json=True, response_template=TOOL_TEMPLATE)
    traj = runner(env, Calculator(), max_turns=2, max_total_len=64, fmt=fmt).trajectory(
        ids(env, " lazy"), GREEDY, seed=1)
    error = ids(env, TOOL_TEMPLATE.format(output="error: the tool call is not valid JSON (Extra data)"))
    assert traj.output_ids == ids(env, " quick1+2 fox") + error + ids(env, " quick1+2 fox")
    assert (traj.tool_calls, traj.tool_errors, traj.finish_reason) == (1, 1, "max_turns")


class ScriptedCode(PythonSandbox):
    """The real sandbox, running the next of ``codes`` whatever the call's body was."""

    def __init__(self, codes: list[str], **kw) -> None:
        super().__init__(**kw)
        self.codes = list(codes)

    def call(self, arguments):
        return super().call({"code": self.codes.pop(0)})


SANDBOX_ESCAPES = {
    "infinite loop": ("while True:\n    pass", "error: CPU time limit of 1 s exceeded"),
    "10 GB allocation": ("x = bytearray(10 * 2**30)", "MemoryError"),
    "network connection": ("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))",
                           "PermissionError: socket.connect is refused in the python tool (no network, no processes)"),
    "write outside scratch": ("open('/tmp/sfpo-tool-escape.txt', 'w').write('x')",
                              "PermissionError: writing outside the scratch directory is refused: "
                              "/tmp/sfpo-tool-escape.txt"),
}


def test_sandbox_failures_are_tool_errors_and_the_trajectory_goes_on(env):
    codes = [code for code, _ in SANDBOX_ESCAPES.values()] + ["print(6 * 7)"]
    tool = ScriptedCode(codes, cpu_s=1, wall_s=10, memory_mb=512)
    traj = runner(env, tool, max_turns=6, max_total_len=400).trajectory(ids(env, " lazy"), GREEDY, seed=1)
    call = ids(env, " quick1+2 fox")
    want = []
    for _, output in SANDBOX_ESCAPES.values():
        want += call + ids(env, TOOL_TEMPLATE.format(output=output))
    want += call + ids(env, TOOL_TEMPLATE.format(output="42\n")) + call
    assert traj.output_ids == want
    assert (traj.turns, traj.tool_calls, traj.tool_errors, traj.tool_timeouts) == (6, 5, 4, 1)
    assert not Path("/tmp/sfpo-tool-escape.txt").exists()


def test_trajectory_masks_reach_the_training_tensors(env):
    """collate: tool tokens off the loss mask and with no rollout logprob, the rest in place."""
    prompt = ids(env, " lazy")
    traj = runner(env, Calculator(), max_turns=2, max_total_len=64).trajectory(prompt, GREEDY, seed=3)
    sample = Sample(prompt_index=0, group_id=0, prompt_ids=prompt, response_ids=traj.output_ids,
                    rollout_logprobs=traj.output_logprobs, weight_version=0, loss_mask=traj.loss_mask)
    batch = collate([sample], pad_id=0)
    p, r = len(prompt), len(traj.output_ids)
    # Position t predicts token t + 1: response token j sits at p - 1 + j.
    assert batch.loss_mask[0].tolist() == [False] * (p - 1) + [bool(m) for m in traj.loss_mask] + \
        [False] * (batch.seq_length - p + 1 - r)
    assert batch.rollout_logprobs[0, p - 1:p - 1 + r].tolist() == pytest.approx(traj.output_logprobs)
    assert batch.num_response_tokens == 10 and r == 13


@pytest.mark.flags("--rollout-mode", "--tool", "--max-turns", "--max-total-response-len", "--tool-call-format",
                   "--tool-call-start", "--tool-call-end", "--tool-response-template")
@pytest.mark.parametrize("tool, fmt, output, total", [
    ("calculator", "code", "3", 100),
    ("rl_test_tools:Reverse", "code", "2+1", 100),
    ("python", "code", "", 100),  # the code "1+2" prints nothing
    ("calculator", "json", "error: the tool call is not valid JSON (Extra data)", 100),
    ("calculator", "code", "3", 11),
])
def test_multi_turn_flags_drive_the_rollout_worker(env, tool, fmt, output, total, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    data = env["root"] / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": " lazy", "answer": "x"}) + "\n")
    args = build_rl_parser().parse_args([
        "--model-config", str(env["model"]), "--prompt-data", str(data), "--no-chat-template",
        "--rollout-batch-size", "1", "--n-samples-per-prompt", "2", "--rollout-top-k", "1",
        "--rollout-max-response-len", "16", "--rollout-mode", "multi-turn", "--tool", tool, "--max-turns", "2",
        "--max-total-response-len", str(total), "--tool-call-format", fmt, "--tool-call-start", TOOL_CALL[0],
        "--tool-call-end", TOOL_CALL[1], "--tool-response-template", TOOL_TEMPLATE])
    tok = env["tokenizer"]
    dataset = load_prompt_dataset(args.prompt_data, tok, **dataset_kwargs(args))
    worker = RolloutWorker(args, RolloutClient([env["url"]]), tok, dataset, PromptSampler(dataset, 1, seed=0),
                           env["rewards"])
    batch = worker.collect(1, 0)
    call, obs = ids(env, " quick1+2 fox"), ids(env, TOOL_TEMPLATE.format(output=output))
    want = (call + obs + call)[:total]
    mask = ([1] * 5 + [0] * len(obs) + [1] * 5)[:total]
    for s in batch.samples:
        assert s.prompt_ids == ids(env, " lazy")
        assert s.response_ids == want and s.loss_mask == mask
        assert s.finish_reason == ("max_turns" if total == 100 else "length")
        assert s.weight_version == 0
    m = batch.metrics
    assert m["rollout/turns_mean"] == (2 if total == 100 else 2 if total > 5 + len(obs) else 1)
    assert m["rollout/tool_calls"] == 2  # one per sample
    assert m["rollout/tool_errors"] == (2 if fmt == "json" else 0) and m["rollout/tool_timeouts"] == 0
    assert m["rollout/tool_token_fraction"] == pytest.approx(mask.count(0) / len(want))


def test_a_tool_that_does_not_import_is_refused_at_start_up(env):
    from sfpo_megatron.rl.loop import check_multi_turn_args

    args = build_rl_parser().parse_args(["--model-config", str(env["model"]), "--rollout-mode", "multi-turn",
                                         "--tool", "no_such_module:Tool"])
    with pytest.raises(ValueError, match=r"--tool 'no_such_module:Tool': cannot import it "
                                         r"\(ModuleNotFoundError: No module named 'no_such_module'\)"):
        check_multi_turn_args(args)
    args.tool, args.max_turns = "calculator", 0
    with pytest.raises(ValueError, match="--max-turns must be >= 1, got 0"):
        check_multi_turn_args(args)


def test_generate_groups_scores_whole_trajectories(env):
    """The reward sees the decoded trajectory (tool output included); versions are per sample."""
    data = [{"prompt": " lazy", "answer": "x"}]
    path = env["root"] / "one.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    tok = env["tokenizer"]
    dataset = load_prompt_dataset(str(path), tok, apply_chat_template=False)
    mt = runner(env, Calculator(), max_turns=2, max_total_len=64)
    groups, _ = generate_groups(None, [dataset[0]], tok, env["rewards"], n=2, params=GREEDY, seed=11,
                                expected_version="0", multi_turn=mt)
    g = groups[0]
    assert g.texts == [" quick1+2 fox jumps3 over quick1+2 fox"] * 2
    assert g.rewards == [1.0, 1.0] and g.weight_versions == ["0", "0"]
    assert [s["tool_calls"] for s in g.tool_stats] == [1.0, 1.0]

