"""Synchronous vs asynchronous rollouts, with and without VCPO, on the demo task.

    python benchmarks/async_vcpo.py --seeds 3 [--method grpo] [--rl-steps 40] [--reuse-warm-start]

One SFT warm start (the demo's pipeline), then per seed one RL run per configuration, one after
the other (an asynchronous run uses both cores: the trainer and the CPU rollout server):

    sync              synchronous rollouts (generation, then training)
    async_k2          --async-rollout --max-staleness 2, plain update on stale samples
    async_k2_vcpo     ... --vcpo (truncated IS 8, sqrt ESS LR scaling)
    async_k8          --max-staleness 8
    async_k8_vcpo     ... --vcpo
    async_k2_opob     --max-staleness 2 --vcpo --off-policy-baseline opob (logit grad norms)
    (async_k2_opob_exact, on request: OPOB with the exact per-trajectory gradient norms)

Reported per configuration (mean over seeds, and per seed): training wall-clock for the same
number of rollouts (the run's step times minus evaluation; the evaluation is the same work for
every configuration and, in async mode, overlaps generation), its ratio to sync measured in the
same session with a percentile-bootstrap 95 % CI over seeds, best and final validation accuracy,
mean staleness, mean ESS ratio ρ and mean LR scale, and for OPOB the time of its gradient-norm
pass. Writes benchmarks/results/async_vcpo.json and .png (accuracy against training wall-clock,
one line per run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sfpo_megatron.demo.pipeline import DemoConfig, Paths, Timer, rl_job, run_jobs, warm_start  # noqa: E402
from sfpo_megatron.demo.report import (  # noqa: E402
    bootstrap_ratio_ci,
    curve_from_metrics,
    read_metrics,
    write_json_atomic,
)
from sfpo_megatron.demo.task import TASKS  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
CONFIGS: dict[str, list[str]] = {
    "sync": [],
    "async_k2": ["--async-rollout", "--max-staleness", "2"],
    "async_k2_vcpo": ["--async-rollout", "--max-staleness", "2", "--vcpo"],
    "async_k8": ["--async-rollout", "--max-staleness", "8"],
    "async_k8_vcpo": ["--async-rollout", "--max-staleness", "8", "--vcpo"],
    "async_k2_opob": ["--async-rollout", "--max-staleness", "2", "--vcpo", "--off-policy-baseline", "opob",
                      "--opob-grad-norm", "logit"],
    # Not in the default set: the exact per-trajectory norms (one extra backward per trajectory).
    "async_k2_opob_exact": ["--async-rollout", "--max-staleness", "2", "--vcpo", "--off-policy-baseline", "opob",
                            "--opob-grad-norm", "exact"],
}
DEFAULT_CONFIGS = [n for n in CONFIGS if n != "async_k2_opob_exact"]
COLORS = {"sync": "black", "async_k2": "tab:orange", "async_k2_vcpo": "tab:blue", "async_k8": "tab:red",
          "async_k8_vcpo": "tab:green", "async_k2_opob": "tab:purple", "async_k2_opob_exact": "tab:brown"}


def repo_relative(path: str | Path) -> str | None:
    """``path`` relative to the repository root for the results JSON; None outside the repository
    (a machine's scratch directory means nothing on another machine)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--method", default="grpo", choices=["grpo", "sfpo"])
    p.add_argument("--task", default="basic_arithmetic", choices=sorted(TASKS))
    p.add_argument("--rl-steps", type=int, default=40)
    p.add_argument("--eval-prompts", type=int, default=500)
    p.add_argument("--eval-interval", type=int, default=5)
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help="comma-separated subset of " + ",".join(CONFIGS))
    p.add_argument("--from-json", default=None, help="print the report of a results JSON and exit")
    p.add_argument("--work", default=None, help="work directory (default demo_out/bench_TASK)")
    p.add_argument("--reuse-warm-start", action="store_true")
    p.add_argument("--reuse-runs", action="store_true",
                   help="keep runs whose metrics.jsonl already has all --rl-steps (resume a benchmark)")
    p.add_argument("--name", default="async_vcpo")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    unknown = set(a.configs.split(",")) - set(CONFIGS)
    if unknown:
        p.error(f"unknown --configs {sorted(unknown)}; choose from {list(CONFIGS)}")
    return a


def summarize_run(records: list[dict], label: str) -> dict:
    curve = curve_from_metrics(records, label)
    steps = [r for r in records if r.get("iteration", 0) > 0]

    def mean(key: str) -> float | None:
        vals = [float(r[key]) for r in steps if key in r]
        return statistics.fmean(vals) if vals else None

    return {"train_wall_s": curve.wall_s[-1], "rollouts": curve.rollouts[-1],
            "best_accuracy": max(curve.accuracy), "final_accuracy": curve.accuracy[-1],
            "staleness_mean": mean("async/staleness_mean"), "rho_mean": mean("vcpo/rho"),
            "rho_min": min((float(r["vcpo/rho"]) for r in steps if "vcpo/rho" in r), default=None),
            "lr_scale_mean": mean("vcpo/lr_scale"), "opob_grad_norm_s_mean": mean("time/opob_grad_norm_s"),
            "update_s_mean": mean("time/update_s"), "rollout_wait_s_mean": mean("time/rollout_wait_s"),
            "curve": {"steps": curve.steps, "rollouts": curve.rollouts, "accuracy": curve.accuracy,
                      "wall_s": curve.wall_s}}


def aggregate(runs: dict[str, list[dict]]) -> dict:
    out = {}
    sync = runs.get("sync")
    for name, per_seed in runs.items():
        agg = {"train_wall_s_mean": statistics.fmean(r["train_wall_s"] for r in per_seed),
               "best_accuracy_mean": statistics.fmean(r["best_accuracy"] for r in per_seed),
               "final_accuracy_mean": statistics.fmean(r["final_accuracy"] for r in per_seed)}
        for key in ("staleness_mean", "rho_mean", "lr_scale_mean", "opob_grad_norm_s_mean", "update_s_mean"):
            vals = [r[key] for r in per_seed if r[key] is not None]
            agg[key] = statistics.fmean(vals) if vals else None
        if sync and name != "sync" and len(sync) == len(per_seed):
            ratio, lo, hi = bootstrap_ratio_ci([r["train_wall_s"] for r in sync],
                                               [r["train_wall_s"] for r in per_seed])
            agg["speedup_vs_sync"] = {"ratio": ratio, "ci95": [lo, hi]}
        out[name] = agg
    return out


def format_report(agg: dict, seeds: int, method: str) -> str:
    def f(x, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    lines = [f"{method.upper()} on the demo task, {seeds} seed(s) per configuration (means over seeds)",
             f"{'config':<19} {'train wall s':>12} {'speedup vs sync (95% CI)':>26} {'best acc':>9} "
             f"{'final acc':>9} {'stale':>6} {'rho':>6} {'lr scale':>8} {'update s':>8} {'opob s':>7}"]
    for name, a in agg.items():
        sp = a.get("speedup_vs_sync")
        sp_s = "-" if sp is None else f"{sp['ratio']:.2f}x ({sp['ci95'][0]:.2f}-{sp['ci95'][1]:.2f})"
        lines.append(f"{name:<19} {a['train_wall_s_mean']:>12.1f} {sp_s:>26} "
                     f"{100 * a['best_accuracy_mean']:>8.1f}% {100 * a['final_accuracy_mean']:>8.1f}% "
                     f"{f(a['staleness_mean'], '.2f'):>6} {f(a['rho_mean'], '.3f'):>6} "
                     f"{f(a['lr_scale_mean'], '.3f'):>8} {f(a['update_s_mean'], '.2f'):>8} "
                     f"{f(a['opob_grad_norm_s_mean'], '.3f'):>7}")
    lines.append("update s: mean time of one update per step (its OPOB gradient-norm pass included, the "
                 "opob s column)")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for name, per_seed in runs.items():
        for i, r in enumerate(per_seed):
            c = r["curve"]
            ax.plot(c["wall_s"], [100 * x for x in c["accuracy"]], marker="o", markersize=2.5,
                    color=COLORS.get(name), alpha=0.75, label=name if i == 0 else None)
    ax.set_xlabel("training wall-clock (s, evaluation excluded)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.from_json:
        data = json.loads(Path(a.from_json).read_text())
        print(format_report(data["aggregate"], len(next(iter(data["runs"].values()))), data["method"]))
        return 0
    cfg = DemoConfig(out=Path(a.work or REPO / "demo_out" / f"bench_{a.task}"), task=a.task, rl_steps=a.rl_steps,
                     eval_prompts=a.eval_prompts, eval_interval=a.eval_interval, side_by_side=False)
    paths, timer = Paths(cfg.out), Timer()
    t0 = time.perf_counter()
    show = not a.no_progress
    if not (a.reuse_warm_start and (paths.hf / "config.json").exists()):
        warm_start(cfg, paths, timer, show)
    names = a.configs.split(",")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    # Seed-major order: every configuration of a seed runs close in time (machine load drifts).
    for seed in range(a.seeds):
        for name in names:
            tag = f"_{name}_s{seed}"
            done = paths.rl(f"{a.method}{tag}") / "logs" / "metrics.jsonl"
            if a.reuse_runs and done.exists() and any(r.get("iteration") == a.rl_steps for r in read_metrics(done)):
                metrics = done  # finished in an earlier invocation (its wall-clock is in its metrics)
            else:
                job = rl_job(replace(cfg, extra_rl_flags=CONFIGS[name]), paths, a.method, seed, tag=tag)
                timer.run(f"{name}_s{seed}", run_jobs, [job], show)
                metrics = job.metrics
            r = summarize_run(read_metrics(metrics), f"{name} seed {seed}")
            runs[name].append({"seed": seed, **r})
            print(f"seed {seed} {name}: train wall {r['train_wall_s']:.1f} s, best acc "
                  f"{100 * r['best_accuracy']:.1f} %, final {100 * r['final_accuracy']:.1f} %", flush=True)
    agg = aggregate(runs)
    report = format_report(agg, a.seeds, a.method)
    print("\n" + report)
    png = plot(runs, RESULTS / f"{a.name}.png", f"{a.task}, {a.method.upper()}: sync vs async (k = max staleness)")
    config = cfg.as_dict() | {"out": repo_relative(cfg.out)}  # no absolute paths in results
    out = {"config": config, "method": a.method, "configs": {n: CONFIGS[n] for n in names},
           "runs": runs, "aggregate": agg, "timings": timer.phases, "total_wall_s": time.perf_counter() - t0,
           "plot": str(png.relative_to(REPO))}
    path = write_json_atomic(RESULTS / f"{a.name}.json", out)
    print(f"wrote {path.relative_to(REPO)} and {png.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
