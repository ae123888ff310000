"""`python -m sfpo_megatron.demo` (`make demo`): tiny SFPO-vs-GRPO run on CPU, end to end.

Builds a reasoning-gym arithmetic task with its SentencePiece tokenizer, warm-starts a tiny
Qwen2-shaped model with `sfpo-megatron pretrain` (torchrun, 2 processes), exports it to HF, runs
GRPO and SFPO from it through the CPU rollout server, then prints validation accuracy against
rollouts for both and the rollouts SFPO needs to reach GRPO's best, and writes
`OUT/sfpo_vs_grpo.png`, `OUT/table.txt` and `OUT/results.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sfpo_megatron.demo.pipeline import DemoConfig, DemoError, Paths, Timer, run_rl_pair, warm_start
from sfpo_megatron.demo.report import compare, curve_from_metrics, format_table, plot_curves, read_metrics
from sfpo_megatron.demo.task import TASKS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser("python -m sfpo_megatron.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    p.add_argument("--task", default="basic_arithmetic", choices=sorted(TASKS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="reduced sizes: checks every phase in a few minutes")
    p.add_argument("--rl-steps", type=int, default=None, help="RL steps per method")
    p.add_argument("--sequential", action="store_true", help="run GRPO then SFPO instead of side by side")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    overrides = {"out": Path(args.out), "task": args.task, "seed": args.seed,
                 "side_by_side": not args.sequential}
    if args.rl_steps is not None:
        overrides["rl_steps"] = args.rl_steps
    return DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)


def run_demo(cfg: DemoConfig, show_progress: bool = True) -> dict:
    """All phases; returns what results.json holds."""
    paths = Paths(cfg.out)
    timer = Timer()
    t0 = time.perf_counter()
    summary = warm_start(cfg, paths, timer, show_progress)
    metrics = run_rl_pair(cfg, paths, cfg.seed, timer, show_progress=show_progress)
    curves = {m: curve_from_metrics(read_metrics(path), m.upper()) for m, path in metrics.items()}
    comparison = compare(curves["grpo"], curves["sfpo"])
    table = format_table(curves["grpo"], curves["sfpo"], comparison)
    plot = plot_curves([curves["grpo"], curves["sfpo"]], paths.root / "sfpo_vs_grpo.png",
                       title=f"{cfg.task}: validation accuracy (avg@{cfg.eval_samples}, T=1, "
                             f"top-p {cfg.eval_top_p})", target=comparison.grpo_best)
    results = {
        "config": cfg.as_dict(), "task": summary, "timings": timer.phases,
        "total_wall_s": time.perf_counter() - t0, "comparison": comparison.as_dict(),
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
          f"{cfg.rollout_prompts} prompts x {cfg.samples_per_prompt} samples per method, "
          f"validation {cfg.eval_prompts} prompts x {cfg.eval_samples} samples (T=1, top-p {cfg.eval_top_p})\n")
    print(results["table"])
    print(f"\n{format_timings(results)}")
    print(f"plot: {results['plot']}; table: {cfg.out}/table.txt; results: {cfg.out}/results.json")
    return 0


if __name__ == "__main__":  # the phases spawn processes: keep the guard
    sys.exit(main())
