"""`python -m sfpo_megatron.demo --task tool-arithmetic`: a tiny model learns to use a calculator.

The task (`task.TOOL_ARITHMETIC`) is reasoning-gym arithmetic with 3-digit terms, which the
demo's ~100k-parameter model cannot compute. Its SFT warm start shows the tool-call format:

    User: Calculate 261 - 120.
    Assistant: <code>261 - 120</code><output>141</output> 141

(`<output>…</output>` is what the rollout appends after running the call). RL then runs
`sfpo-megatron rl --rollout-mode multi-turn --tool calculator` from the warm start, rewarding
the answer after the last tool output (`task.final_answer_reward`). Finally
`sfpo-megatron eval` scores the warm start and the RL policy twice each: with the tool
(multi-turn) and without it (single-turn: the model writes the "output" itself, so the reward
measures its own arithmetic).

Measured (2 CPU cores, default sizes: 64-dim 2-layer model, 12,000 SFT iterations, 20 RL steps of
32 x 8 trajectories, 200 x 2 validation samples at T = 1, top-p 0.7; one seed; 6.6 min):

    policy                  with the tool   without
    SFT warm start                  95.8%      2.8%
    after 20 RL steps               90.5%      1.8%

The tool is what solves the task: the model cannot add 3-digit numbers itself (2-3 %), but it has
learned to copy the terms into the call and the tool's answer out of its output. Copying takes
long SFT: at 800 iterations (loss 1.09) the model wrote plausible digits but copied none of
100 calls exactly (greedy); at 5,000 (loss 0.73) 44 of 100; at 12,000 (loss 0.66) the warm
start is already at 96 %. RL from there does not improve it (its five evaluations: 95.8, 92.5, 95.5, 94.8, 90.5 %),
every trajectory makes exactly one call, and no call fails.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from sfpo_megatron.demo.pipeline import (
    DemoConfig,
    DemoError,
    Job,
    Paths,
    Timer,
    rl_flags,
    run_jobs,
    warm_start,
)
from sfpo_megatron.demo.task import TOOL_CALL, TOOL_TASK, TOOL_TEMPLATE, VALID_SEED, get_task

REWARD_FN = "sfpo_megatron.demo.task:final_answer_reward"
PER_TURN_TOKENS = 16  # a call "<code>261 - 120</code>" is ~11 tokens, an answer ~5
TOTAL_TOKENS = 40


def tool_config(quick: bool = False, **overrides: Any) -> DemoConfig:
    """The demo's sizes for the tool task: longer responses, SFT for a fixed number of
    iterations; ``quick``: every phase runs in a few minutes, nothing is expected to learn."""
    base = dict(task=TOOL_TASK, max_response_len=PER_TURN_TOKENS, sft_stop_at_target=False,
                sft_iters=12_000, rl_steps=20, rollout_prompts=32, eval_prompts=200, eval_interval=5)
    if quick:
        base.update(sft_docs=2_000, sft_iters=30, rl_steps=2, rollout_prompts=8, samples_per_prompt=4,
                    mini_batches=2, train_prompts=200, eval_prompts=16, eval_interval=1, sfpo_window=2)
    return DemoConfig(**{**base, **overrides})


def multi_turn_flags() -> list[str]:
    return ["--rollout-mode", "multi-turn", "--tool", "calculator", "--tool-call-format", "code",
            "--tool-call-start", TOOL_CALL[0], "--tool-call-end", TOOL_CALL[1],
            "--tool-response-template", TOOL_TEMPLATE, "--max-turns", "2",
            "--max-total-response-len", str(TOTAL_TOKENS)]


def rl_job(cfg: DemoConfig, paths: Paths) -> Job:
    out = paths.rl("tool")
    flags = rl_flags(cfg, paths, "sfpo", cfg.seed, out)
    flags += ["--reward-fn", REWARD_FN, "--save", str(out / "ckpt"), "--save-interval", str(cfg.rl_steps),
              *multi_turn_flags()]
    cmd = [sys.executable, "-m", "sfpo_megatron.cli", "rl"] + flags
    return Job("RL SFPO multi-turn", cmd, paths.logs / "rl_tool.log", out / "logs" / "metrics.jsonl", cfg.rl_steps)


def eval_job(cfg: DemoConfig, paths: Paths, policy: str, with_tool: bool) -> Job:
    """`sfpo-megatron eval` of the warm start (``policy`` "sft") or the RL policy ("rl")."""
    source = (["--hf-checkpoint", str(paths.hf)] if policy == "sft"
              else ["--load", str(paths.rl("tool") / "ckpt")])
    mode = multi_turn_flags() + ["--eval-max-response-len", str(PER_TURN_TOKENS)] if with_tool else \
        ["--eval-max-response-len", str(TOTAL_TOKENS)]
    task = get_task(cfg.task)
    cmd = [sys.executable, "-m", "sfpo_megatron.cli", "eval", "--model-config", str(paths.model_config),
           "--tokenizer-path", str(paths.tokenizer), *source,
           "--eval-prompt-data", "val=" + task.spec(cfg.eval_prompts, VALID_SEED),
           "--n-samples-per-eval-prompt", str(cfg.eval_samples), "--eval-temperature", "1.0",
           "--eval-top-p", str(cfg.eval_top_p), "--reward-fn", REWARD_FN, "--reward-num-workers", "1",
           "--seed", str(cfg.seed), *mode]
    name = f"eval {policy} {'with' if with_tool else 'without'} tool"
    return Job(name, cmd, paths.logs / f"eval_{policy}_{'tool' if with_tool else 'no_tool'}.log")


def eval_metrics(job: Job) -> dict[str, float]:
    """The metrics `sfpo-megatron eval` printed (its last JSON line)."""
    for line in reversed(job.log.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise DemoError(f"{job.name} printed no metrics; log {job.log}")


def format_table(cfg: DemoConfig, acc: dict[str, dict[str, float]]) -> str:
    k = cfg.eval_samples
    rows = [f"validation accuracy (avg@{k}, {cfg.eval_prompts} prompts, T=1, top-p {cfg.eval_top_p})",
            f"{'policy':<22}{'with the tool':>15}{'without':>10}"]
    for policy, label in (("sft", "SFT warm start"), ("rl", f"after {cfg.rl_steps} RL steps")):
        rows.append(f"{label:<22}{100 * acc[policy]['tool']:>14.1f}%{100 * acc[policy]['no_tool']:>9.1f}%")
    return "\n".join(rows)


def run_tool_demo(cfg: DemoConfig, show_progress: bool = True) -> dict:
    paths = Paths(cfg.out)
    timer = Timer()
    t0 = time.perf_counter()
    summary = warm_start(cfg, paths, timer, show_progress)
    timer.run("rl", run_jobs, [rl_job(cfg, paths)], show_progress)
    acc: dict[str, dict[str, float]] = {}
    tool_use: dict[str, dict[str, float]] = {}
    for policy in ("sft", "rl"):
        for with_tool in (True, False):
            job = eval_job(cfg, paths, policy, with_tool)
            timer.run(job.name.replace(" ", "_"), run_jobs, [job], False)
            m = eval_metrics(job)
            acc.setdefault(policy, {})["tool" if with_tool else "no_tool"] = m[f"eval/val/avg@{cfg.eval_samples}"]
            if with_tool:
                tool_use[policy] = {key.split("/")[-1]: v for key, v in m.items()
                                    if key.startswith("eval/val/") and ("tool" in key or "turns" in key)}
    table = format_table(cfg, acc)
    results = {"config": cfg.as_dict(), "task": summary, "accuracy": acc, "tool_use": tool_use,
               "timings": timer.phases, "total_wall_s": time.perf_counter() - t0, "table": table}
    (paths.root / "table.txt").write_text(table + "\n")
    (paths.root / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(cfg: DemoConfig, show_progress: bool = True) -> int:
    print(f"tool-use demo: output in {cfg.out}/ (logs in {cfg.out}/logs/)", flush=True)
    try:
        results = run_tool_demo(cfg, show_progress)
    except DemoError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    print("\n" + results["table"])
    print(f"\ntool use after RL (with the tool): {results['tool_use'].get('rl')}")
    print(f"total {results['total_wall_s']:.0f} s wall; table: {cfg.out}/table.txt; results: {cfg.out}/results.json")
    return 0

