"""`python -m sfpo_megatron.demo` (`make demo`): tiny SFPO-vs-GRPO run on CPU, end to end.

Builds a reasoning-gym arithmetic task with its SentencePiece tokenizer, warm-starts a tiny
Qwen2-shaped model with `sfpo-megatron pretrain` (torchrun, 2 processes), exports it to HF, runs
three arms from it through the CPU rollout server: GRPO (one optimizer pass over each rollout
batch), GRPO with `--ppo-epochs K+1` ("grpo-e4": SFPO's optimizer steps per rollout batch, no
reposition) and SFPO. Then prints validation accuracy against rollouts for all three and, against
each control, the rollouts and wall-clock SFPO needs to reach that control's best (one seed:
point values; `benchmarks/sfpo_vs_grpo.py` repeats it over seeds with confidence intervals), and
writes `OUT/sfpo_vs_grpo.png`, `OUT/table.txt` and `OUT/results.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sfpo_megatron.demo.pipeline import DemoConfig, DemoError, Paths, Timer, run_rl_arms, warm_start
from sfpo_megatron.demo.report import compare, curve_from_metrics, format_table, plot_curves, read_metrics
from sfpo_megatron.demo.task import TASKS, TOOL_TASK
from sfpo_megatron.demo.tool_use import main as tool_main
from sfpo_megatron.demo.tool_use import tool_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser("python -m sfpo_megatron.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    p.add_argument("--task", default="basic_arithmetic", choices=sorted(TASKS) + [TOOL_TASK],
                   help=f"{TOOL_TASK}: the tool-use demo (SFT shows calculator calls, multi-turn RL, "
                        "accuracy with and without the tool)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="reduced sizes: checks every phase in a few minutes")
    p.add_argument("--rl-steps", type=int, default=None, help="RL steps per arm")
    p.add_argument("--sequential", action="store_true", help="run the arms one after another, not side by side")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    overrides = {"out": Path(args.out), "task": args.task, "seed": args.seed,
                 "side_by_side": not args.sequential}
    if args.rl_steps is not None:
        overrides["rl_steps"] = args.rl_steps
    return DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)


def table_notes(cfg: DemoConfig) -> list[str]:
    notes = ["one seed: point values, no confidence intervals; benchmarks/sfpo_vs_grpo.py repeats "
             "the comparison over seeds with bootstrap 95 % CIs"]
    if cfg.side_by_side:
        notes.append("wall-clock: the arms ran side by side on the same cores, so an arm's seconds "
                     "include waiting for the others; rollouts are the primary measure")
    return notes


def run_demo(cfg: DemoConfig, show_progress: bool = True) -> dict:
    """All phases; returns what results.json holds."""
    paths = Paths(cfg.out)
    timer = Timer()
    t0 = time.perf_counter()
    summary = warm_start(cfg, paths, timer, show_progress)
    metrics = run_rl_arms(cfg, paths, cfg.seed, timer, show_progress=show_progress)
    curves = {arm: curve_from_metrics(read_metrics(path), arm.upper()) for arm, path in metrics.items()}
    comparisons = [compare(curves[arm], curves["sfpo"]) for arm in curves if arm != "sfpo"]
    table = format_table(curves, comparisons, cfg.passes_per_batch, notes=table_notes(cfg))
    plot = plot_curves(list(curves.values()), paths.root / "sfpo_vs_grpo.png",
                       title=f"{cfg.task}: validation accuracy (avg@{cfg.eval_samples}, T=1, "
                             f"top-p {cfg.eval_top_p})",
                       targets={f"{c.control.upper()} best": c.control_best for c in comparisons})
    results = {
        "config": cfg.as_dict(), "task": summary, "timings": timer.phases,
        "total_wall_s": time.perf_counter() - t0,
        "comparisons": {c.control: c.as_dict() for c in comparisons},
        "curves": {m: vars(c) for m, c in curves.items()}, "plot": str(plot),
    }
    (paths.root / "table.txt").write_text(table + "\n")
    (paths.root / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    results["table"] = table
    return results


def format_timings(results: dict) -> str:
    parts = [f"{name} {t['wall_s']:.0f} s" for name, t in results["timings"].items()]
    cpu = sum(t["cpu_s"] for t in results["timings"].values())
    return (f"time: {', '.join(parts)}; total {results['total_wall_s']:.0f} s wall, "
            f"{cpu:.0f} CPU-s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.task == TOOL_TASK:
        overrides = {"out": Path(args.out), "seed": args.seed}
        if args.rl_steps is not None:
            overrides["rl_steps"] = args.rl_steps
        return tool_main(tool_config(args.quick, **overrides), show_progress=not args.no_progress)
    cfg = config_from_args(args)
    print(f"sfpo demo: task {cfg.task}, output in {cfg.out}/ (logs in {cfg.out}/logs/)", flush=True)
    try:
        results = run_demo(cfg, show_progress=not args.no_progress)
    except DemoError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    task = results["task"]
    stopped = " (stopped at the target loss)" if task["sft_stopped_at_target"] else ""
    print(f"\ntask {task['task']} {task['task_config']}\nwarm start: {task['sft_iterations']} SFT "
          f"iterations{stopped}, loss {task['sft_loss']:.3f}; RL: {cfg.rl_steps} steps x "
          f"{cfg.rollout_prompts} prompts x {cfg.samples_per_prompt} samples per arm, "
          f"validation {cfg.eval_prompts} prompts x {cfg.eval_samples} samples (T=1, top-p {cfg.eval_top_p})\n")
    print(results["table"])
    print(f"\n{format_timings(results)}")
    print(f"plot: {results['plot']}; table: {cfg.out}/table.txt; results: {cfg.out}/results.json")
    return 0


if __name__ == "__main__":  # the phases spawn processes: keep the guard
    sys.exit(main())
