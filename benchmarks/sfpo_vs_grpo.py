"""SFPO vs GRPO at tiny scale: rollouts and wall-clock SFPO needs to reach GRPO's best accuracy.

    python benchmarks/sfpo_vs_grpo.py --seeds 3 --task basic_arithmetic [--rl-steps 40]

One SFT warm start (the demo's pipeline: SentencePiece tokenizer, `sfpo-megatron pretrain` under
torchrun, HF export), then per seed a GRPO and an SFPO run from it with that seed (the two side
by side, one core each). Per seed and in aggregate: both methods' best validation accuracy, the
rollouts and training wall-clock (evaluation excluded) each needs to reach GRPO's best, and the
step at which SFPO's entropy switch-off fired. Aggregate ratios are ratios of means over the seeds
where SFPO reached GRPO's best, with percentile-bootstrap 95 % CIs (seeds resampled).

Validation: `--eval-prompts` prompts x `--eval-samples` samples (avg@k at temperature 1,
top-p 0.7); the largest standard error of any single evaluation is reported and must stay below
1.5 points (the defaults, 1000 x 2, give about 1.2).

Writes benchmarks/results/sfpo_vs_grpo.json and .png; work files under demo_out/bench_TASK/.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sfpo_megatron.demo.pipeline import DemoConfig, Paths, Timer, run_rl_pair, warm_start  # noqa: E402
from sfpo_megatron.demo.report import (  # noqa: E402
    bootstrap_ratio_ci,
    compare,
    curve_from_metrics,
    eval_standard_error,
    plot_curves,
    read_metrics,
    write_json_atomic,
)
from sfpo_megatron.demo.task import TASKS  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SE_LIMIT = 0.015


def repo_relative(path: str | Path) -> str | None:
    """``path`` relative to the repository root for the results JSON; None outside the repository
    (a machine's scratch directory means nothing on another machine)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="RL seeds (runs per method)")
    p.add_argument("--task", default="basic_arithmetic", choices=sorted(TASKS))
    p.add_argument("--rl-steps", type=int, default=40)
    p.add_argument("--eval-prompts", type=int, default=1000)
    p.add_argument("--eval-samples", type=int, default=2)
    p.add_argument("--eval-interval", type=int, default=5)
    p.add_argument("--work", default=None, help="work directory (default demo_out/bench_TASK)")
    p.add_argument("--reuse-warm-start", action="store_true",
                   help="skip the SFT warm start when WORK already holds one")
    p.add_argument("--name", default="sfpo_vs_grpo", help="results file stem")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.seeds < 1:
        p.error(f"--seeds must be >= 1, got {a.seeds}")
    return a


def max_standard_error(curve, n_prompts: int, k: int) -> float:
    passes = curve.pass_at_k or [None] * len(curve.accuracy)
    return max(eval_standard_error(acc, n_prompts, k, pk) for acc, pk in zip(curve.accuracy, passes))


def aggregate(per_seed: list[dict]) -> dict:
    reached = [s for s in per_seed if s["sfpo_rollouts"] is not None and s["sfpo_rollouts"] > 0]
    out: dict = {
        "seeds": len(per_seed),
        "seeds_sfpo_reached_grpo_best": len(reached),
        "grpo_best_mean": statistics.fmean(s["grpo_best"] for s in per_seed),
        "sfpo_best_mean": statistics.fmean(s["sfpo_best"] for s in per_seed),
        "sfpo_trigger_steps": [s["sfpo_trigger_step"] for s in per_seed],
    }
    if reached:
        for key, num, den in (("rollout_ratio", "grpo_rollouts", "sfpo_rollouts"),
                              ("time_ratio", "grpo_wall_s", "sfpo_wall_s")):
            point, lo, hi = bootstrap_ratio_ci([s[num] for s in reached], [s[den] for s in reached])
            out[key] = {"ratio_of_means": point, "ci95": [lo, hi]}
    return out


def format_report(per_seed: list[dict], agg: dict, max_se: float) -> str:
    def r(x) -> str:
        return "-" if x is None else f"{x:.2f}x"

    def n(x) -> str:
        return "never" if x is None else f"{x:,.0f}"

    lines = [f"{'seed':>4} {'GRPO best':>9} {'SFPO best':>9} {'GRPO roll.':>10} {'SFPO roll.':>10} "
             f"{'ratio':>6} {'GRPO s':>7} {'SFPO s':>7} {'ratio':>6} {'trigger':>7}"]
    for s in per_seed:
        lines.append(f"{s['seed']:>4} {100 * s['grpo_best']:>8.1f}% {100 * s['sfpo_best']:>8.1f}% "
                     f"{n(s['grpo_rollouts']):>10} {n(s['sfpo_rollouts']):>10} {r(s['rollout_ratio']):>6} "
                     f"{s['grpo_wall_s']:>7.0f} {n(s['sfpo_wall_s']):>7} {r(s['time_ratio']):>6} "
                     f"{'-' if s['sfpo_trigger_step'] is None else s['sfpo_trigger_step']:>7}")
    lines.append(f"\nmean best accuracy: GRPO {100 * agg['grpo_best_mean']:.1f} %, "
                 f"SFPO {100 * agg['sfpo_best_mean']:.1f} %")
    lines.append(f"SFPO reached GRPO's best in {agg['seeds_sfpo_reached_grpo_best']} of {agg['seeds']} seeds")
    for key, what in (("rollout_ratio", "rollouts"), ("time_ratio", "wall-clock")):
        if key in agg:
            lo, hi = agg[key]["ci95"]
            lines.append(f"GRPO/SFPO {what} to GRPO's best: {agg[key]['ratio_of_means']:.2f}x "
                         f"(95% bootstrap CI {lo:.2f}-{hi:.2f}, over those seeds)")
    lines.append(f"largest standard error of one evaluation: {100 * max_se:.2f} points")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    cfg = DemoConfig(out=Path(a.work or REPO / "demo_out" / f"bench_{a.task}"), task=a.task,
                     rl_steps=a.rl_steps, eval_prompts=a.eval_prompts, eval_samples=a.eval_samples,
                     eval_interval=a.eval_interval)
    paths, timer = Paths(cfg.out), Timer()
    t0 = time.perf_counter()
    show = not a.no_progress
    if not (a.reuse_warm_start and (paths.hf / "config.json").exists()):
        warm_start(cfg, paths, timer, show)
    per_seed, curves = [], []
    for seed in range(a.seeds):
        metrics = run_rl_pair(cfg, paths, seed, timer, tag=f"_s{seed}", show_progress=show)
        grpo = curve_from_metrics(read_metrics(metrics["grpo"]), f"GRPO seed {seed}")
        sfpo = curve_from_metrics(read_metrics(metrics["sfpo"]), f"SFPO seed {seed}")
        curves += [grpo, sfpo]
        c = compare(grpo, sfpo)
        per_seed.append({"seed": seed, **c.as_dict(),
                         "grpo": vars(grpo), "sfpo": vars(sfpo)})
        print(f"seed {seed}: GRPO best {100 * c.grpo_best:.1f} %, SFPO best {100 * c.sfpo_best:.1f} %, "
              f"rollouts to GRPO's best {c.grpo_rollouts} vs {c.sfpo_rollouts}", flush=True)
    max_se = max(max_standard_error(c, cfg.eval_prompts, cfg.eval_samples) for c in curves)
    agg = aggregate(per_seed)
    report = format_report(per_seed, agg, max_se)
    print("\n" + report)
    if max_se >= SE_LIMIT:
        print(f"WARNING: an evaluation's standard error is {100 * max_se:.2f} points (limit 1.5): "
              "use more --eval-prompts / --eval-samples")
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = plot_curves(curves, RESULTS / f"{a.name}.png",
                      title=f"{a.task}: validation accuracy, {a.seeds} seeds per method")
    config = cfg.as_dict() | {"out": repo_relative(cfg.out)}  # no absolute paths in results
    out = {"config": config, "seeds": per_seed, "aggregate": agg,
           "max_eval_standard_error": max_se, "timings": timer.phases,
           "total_wall_s": time.perf_counter() - t0, "plot": str(png.relative_to(REPO))}
    path = write_json_atomic(RESULTS / f"{a.name}.json", out)
    print(f"wrote {path.relative_to(REPO)} and {png.relative_to(REPO)}")
    return 0


if __name__ == "__main__":  # the phases spawn processes: keep the guard
    sys.exit(main())
