"""SFPO's ablations (the paper's Figure 5 grid) at tiny scale, with seeds and bootstrap CIs.

    python benchmarks/sfpo_ablation.py --seeds 5 [--rl-steps 20] [--tasks basic_arithmetic chain_sum_heldout]

Arms, all from one SFT warm start per task and, per seed, with the same seed:

* ``grpo``: GRPO, one optimizer pass over each rollout batch (the reference line);
* ``sfpo``: SFPO at the paper's K = 3, alpha = 0.8 (the centre of both series);
* ``alpha0.5``, ``alpha1.0``: alpha in {0.5, 1.0} at K = 3;
* ``k1``, ``k7``: K in {1, 7} at alpha = 0.8;
* ``no-stage3``: SFPO without Stage III (``--sfpo-no-slow-pass``: after the reposition, no slow pass);
* ``stop-step``: SFPO switched off at a fixed step (``--sfpo-stop-step``, half the RL steps) instead
  of the entropy trigger.

Everything else is the demo's (`DemoConfig`), fixed before running: its learning rate, the paper's
omega = 30 and tau = 1. With fewer RL steps than omega the entropy trigger cannot fire, so only
``stop-step`` switches SFPO off.

Tasks: the demo's ``basic_arithmetic`` (its small question space is shared by the training and
validation streams) and ``chain_sum_heldout``, whose validation questions are disjoint (by text)
from every training question, SFT corpus included; the JSON says how much the unfiltered streams
would overlap.

Per task and arm: best and final validation accuracy (mean over seeds, bootstrap 95 % CI), and the
per-seed paired differences from SFPO (K = 3, alpha = 0.8) and from GRPO with CIs in numbers and
words. Writes benchmarks/results/NAME.json and .png; work files under demo_out/ablation_TASK/.
`--report-only` rebuilds the results from the runs already in the work directories.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.sfpo_vs_grpo import max_standard_error, repo_relative  # noqa: E402
from sfpo_megatron.demo.pipeline import DemoConfig, Paths, Timer, rl_job, run_jobs, warm_start  # noqa: E402
from sfpo_megatron.demo.report import (  # noqa: E402
    Curve,
    bootstrap_mean_ci,
    curve_from_metrics,
    describe_ci,
    read_metrics,
    write_json_atomic,
)
from sfpo_megatron.demo.task import TASKS  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
TASKS_DEFAULT = ("basic_arithmetic", "chain_sum_heldout")
# one colour per arm in every panel
COLORS = {"grpo": "tab:blue", "sfpo": "tab:orange", "alpha0.5": "tab:green", "alpha1.0": "tab:red",
          "k1": "tab:purple", "k7": "tab:brown", "no-stage3": "tab:pink", "stop-step": "tab:gray"}
# Figure 5's panels: which arms each compares (GRPO drawn in all of them).
PANELS = {"alpha (K = 3)": ("alpha0.5", "sfpo", "alpha1.0"),
          "K (alpha = 0.8)": ("k1", "sfpo", "k7"),
          "Stage III, switch-off": ("sfpo", "no-stage3", "stop-step")}


def arms(stop_step: int) -> dict[str, dict]:
    """{arm: (--algorithm, DemoConfig overrides)}; the demo's values stay for everything else."""
    return {
        "grpo": {"algorithm": "grpo"},
        "sfpo": {"algorithm": "sfpo"},
        "alpha0.5": {"algorithm": "sfpo", "sfpo_alpha": 0.5},
        "alpha1.0": {"algorithm": "sfpo", "sfpo_alpha": 1.0},
        "k1": {"algorithm": "sfpo", "sfpo_inner_steps": 1},
        "k7": {"algorithm": "sfpo", "sfpo_inner_steps": 7},
        "no-stage3": {"algorithm": "sfpo", "extra_rl_flags": ["--sfpo-no-slow-pass"]},
        "stop-step": {"algorithm": "sfpo", "extra_rl_flags": ["--sfpo-stop-step", str(stop_step)]},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5, help="RL seeds (runs per arm and task)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="run seeds FIRST..SEEDS-1 only (the report covers 0..SEEDS-1): to split "
                        "the seeds over processes")
    p.add_argument("--tasks", nargs="+", default=list(TASKS_DEFAULT), choices=sorted(TASKS))
    p.add_argument("--rl-steps", type=int, default=20)
    p.add_argument("--stop-step", type=int, default=None, help="the stop-step arm's switch-off "
                   "(default: half of --rl-steps)")
    p.add_argument("--eval-prompts", type=int, default=500,
                   help="validation prompts (a held-out task has fewer distinct questions: all of them)")
    p.add_argument("--eval-samples", type=int, default=2)
    p.add_argument("--heldout-eval-samples", type=int, default=8,
                   help="samples per validation prompt on a task with held-out questions")
    p.add_argument("--eval-interval", type=int, default=5)
    p.add_argument("--work", default=str(REPO / "demo_out"), help="parent of the work directories")
    p.add_argument("--reuse-warm-start", action="store_true",
                   help="skip a task's SFT warm start when its work directory holds one")
    p.add_argument("--skip-done", action="store_true", help="keep the runs that reached --rl-steps")
    p.add_argument("--report-only", action="store_true", help="run nothing: rebuild the results")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, nothing learns")
    p.add_argument("--name", default="sfpo_ablation", help="results file stem")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.seeds < 2:
        p.error(f"--seeds must be >= 2 (the CIs resample seeds), got {a.seeds}")
    return a


def task_config(a: argparse.Namespace, task: str) -> DemoConfig:
    out = Path(a.work) / f"ablation_{task}"
    samples = a.heldout_eval_samples if TASKS[task].heldout_fraction > 0 else a.eval_samples
    if a.quick:  # the quick sizes, whatever the size flags say
        return DemoConfig.quick(out=out, task=task)
    return DemoConfig(out=out, task=task, rl_steps=a.rl_steps, eval_prompts=a.eval_prompts,
                      eval_samples=samples, eval_interval=a.eval_interval)


def arm_jobs(cfg: DemoConfig, paths: Paths, specs: dict[str, dict], seed: int) -> dict:
    """{arm: Job} of one seed: each arm's DemoConfig variant through the demo's own `rl_job`."""
    jobs = {}
    for arm, spec in specs.items():
        overrides = {k: v for k, v in spec.items() if k != "algorithm"}
        variant = dataclasses.replace(cfg, **overrides)
        jobs[arm] = rl_job(variant, paths, spec["algorithm"], seed, tag=f"_{arm}_s{seed}")
    return jobs


def metrics_path(paths: Paths, specs: dict[str, dict], arm: str, seed: int) -> Path:
    return paths.rl(f"{specs[arm]['algorithm']}_{arm}_s{seed}") / "logs" / "metrics.jsonl"


def done(cfg: DemoConfig, path: Path) -> bool:
    return path.exists() and any(r.get("iteration") == cfg.rl_steps for r in read_metrics(path))


def ci_dict(values: list[float], null: float | None = None, above: str = "", below: str = "") -> dict:
    mean, lo, hi = bootstrap_mean_ci(values)
    out = {"mean": mean, "ci95": [lo, hi], "values": values}
    if null is not None:
        out["words"] = describe_ci(lo, hi, null, above, below)
    return out


def summarize_task(per_seed: list[dict], arm_names: list[str]) -> dict:
    """Per arm: best / final accuracy (mean, CI) and paired differences from SFPO and GRPO."""
    agg = {}
    for arm in arm_names:
        best = [s["arms"][arm]["best"] for s in per_seed]
        final = [s["arms"][arm]["final"] for s in per_seed]
        row = {"best": ci_dict(best), "final": ci_dict(final)}
        for ref in ("sfpo", "grpo"):
            if ref == arm:
                continue
            diff = [s["arms"][arm]["best"] - s["arms"][ref]["best"] for s in per_seed]
            row[f"best_minus_{ref}"] = ci_dict(diff, 0.0, f"higher than {ref.upper()}",
                                               f"lower than {ref.upper()}")
        agg[arm] = row
    return agg


def format_task(task: str, agg: dict, n_seeds: int, note: str) -> list[str]:
    lines = [f"{task} ({n_seeds} seeds){note}:",
             f"{'arm':>10} {'best %':>7} {'95 % CI':>13} {'final %':>8}  best - SFPO (points, 95 % CI)"
             "  /  best - GRPO"]
    for arm, row in agg.items():
        b, f = row["best"], row["final"]
        cells = []
        for ref in ("sfpo", "grpo"):
            d = row.get(f"best_minus_{ref}")
            cells.append("-" if d is None else f"{100 * d['mean']:+.1f} ({100 * d['ci95'][0]:+.1f} to "
                         f"{100 * d['ci95'][1]:+.1f}): {d['words']}")
        lines.append(f"{arm:>10} {100 * b['mean']:>7.1f} {100 * b['ci95'][0]:>6.1f}-{100 * b['ci95'][1]:<6.1f}"
                     f" {100 * f['mean']:>8.1f}  {cells[0]}  /  {cells[1]}")
    return lines


def plot(results: dict, path: Path) -> Path:
    """One row per task, one panel per series: mean validation accuracy over seeds by step."""
    matplotlib.use("Agg")  # no display: write files only
    tasks = list(results)
    fig, axes = plt.subplots(len(tasks), len(PANELS), figsize=(5 * len(PANELS), 3.6 * len(tasks)),
                             squeeze=False)
    for r, task in enumerate(tasks):
        per_seed = results[task]["seeds"]
        for c, (title, panel) in enumerate(PANELS.items()):
            ax = axes[r][c]
            for arm in ("grpo",) + panel:
                curves = [s["arms"][arm]["curve"] for s in per_seed]
                steps = curves[0]["steps"]
                acc = 100 * np.mean([cv["accuracy"] for cv in curves], axis=0)
                ax.plot(steps, acc, marker="o", markersize=3, label=arm, color=COLORS[arm],
                        linestyle="--" if arm == "grpo" else "-")
            ax.set_title(f"{task}: {title}", fontsize=9)
            ax.set_xlabel("RL step")
            ax.set_ylabel(f"val. accuracy (%), mean of {len(per_seed)} seeds")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    cfgs = {task: task_config(a, task) for task in a.tasks}
    rl_steps = next(iter(cfgs.values())).rl_steps
    stop_step = a.stop_step if a.stop_step is not None else max(1, rl_steps // 2)
    specs = arms(stop_step)
    timer, t0, show = Timer(), time.perf_counter(), not a.no_progress
    timings_file = Path(a.work) / f"{a.name}_timings.json"
    if timings_file.exists() and (a.report_only or a.reuse_warm_start or a.skip_done):
        timer.phases = json.loads(timings_file.read_text())  # the earlier phases' times
    warm = {}
    for task, cfg in cfgs.items():
        paths = Paths(cfg.out)
        warm_file = paths.root / "warm_start.json"
        if not a.report_only and not (a.reuse_warm_start and (paths.hf / "config.json").exists()):
            task_timer = Timer()
            summary = warm_start(cfg, paths, task_timer, show)
            write_json_atomic(warm_file, {"task": summary, "timings": task_timer.phases})
            timer.phases.update({f"{task}/{k}": v for k, v in task_timer.phases.items()})
            write_json_atomic(timings_file, timer.phases)
        warm[task] = json.loads(warm_file.read_text())["task"] if warm_file.exists() else None
    # Seeds outermost: an interrupted run leaves every task with the same seeds done.
    for seed in range(a.first_seed, a.seeds):
        for task, cfg in cfgs.items():
            paths = Paths(cfg.out)
            if a.report_only or (a.skip_done and all(done(cfg, metrics_path(paths, specs, arm, seed))
                                                     for arm in specs)):
                continue
            jobs = arm_jobs(cfg, paths, specs, seed)
            timer.run(f"{task}/rl_s{seed}", run_jobs, list(jobs.values()), show)
            write_json_atomic(timings_file, timer.phases)
            print(f"{task} seed {seed}: done in {timer.phases[f'{task}/rl_s{seed}']['wall_s']:.0f} s",
                  flush=True)
    results, report = {}, []
    for task, cfg in cfgs.items():
        paths = Paths(cfg.out)
        per_seed = []
        for seed in range(a.seeds):
            if not all(done(cfg, metrics_path(paths, specs, arm, seed)) for arm in specs):
                continue  # --report-only of an unfinished run: finished seeds only
            row = {}
            for arm in specs:
                curve = curve_from_metrics(read_metrics(metrics_path(paths, specs, arm, seed)),
                                           f"{arm} seed {seed}")
                row[arm] = {"best": curve.best, "final": curve.accuracy[-1], "curve": vars(curve)}
            per_seed.append({"seed": seed, "arms": row})
        if len(per_seed) < 2:
            print(f"{task}: fewer than 2 finished seeds, left out of the report")
            continue
        held = (warm[task] or {}).get("heldout")
        n_prompts = held["valid_questions"] if held else cfg.eval_prompts
        max_se = max(max_standard_error(Curve(**s["arms"][arm]["curve"]), n_prompts, cfg.eval_samples)
                     for s in per_seed for arm in specs)
        agg = summarize_task(per_seed, list(specs))
        note = ""
        if held:
            ov = held["unfiltered_overlap"]
            note = (f"; validation: {held['valid_questions']} held-out questions x {cfg.eval_samples} "
                    f"samples, none among the {held['train_questions']} training questions (unfiltered, "
                    f"{ov['in_train']} of {ov['valid_items']} validation items, "
                    f"{100 * ov['share']:.0f} %, would be training questions)")
        report += format_task(task, agg, len(per_seed), note)
        report.append(f"  largest standard error of one evaluation (prompts resampled): {100 * max_se:.2f} points")
        report.append("")
        results[task] = {"config": cfg.as_dict() | {"out": repo_relative(cfg.out)}, "warm_start": warm[task],
                         "seeds": per_seed, "aggregate": agg, "max_eval_standard_error": max_se}
    if not results:
        print("no task has 2 finished seeds: nothing to report")
        return 1
    report.append(f"settings: {rl_steps} RL steps, stop-step arm switched off after step {stop_step}"
                  + ("; the entropy trigger's window (omega = 30) is longer than the run: it never fires"
                     if rl_steps < 30 else ""))
    text = "\n".join(report)
    print("\n" + text)
    out_dir = Path(a.results)
    png = plot(results, out_dir / f"{a.name}.png")
    out = {"arms": specs, "stop_step": stop_step, "tasks": results, "report": text.splitlines(),
           "timings": timer.phases, "plot": repo_relative(png) or png.name,
           "total_wall_s": sum(t["wall_s"] for t in timer.phases.values()) if a.report_only
           else time.perf_counter() - t0}
    path = write_json_atomic(out_dir / f"{a.name}.json", out)
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":  # the phases spawn processes: keep the guard
    sys.exit(main())
