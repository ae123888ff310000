"""SFPO vs GRPO and vs GRPO with SFPO's optimizer steps, at tiny scale: best validation accuracy,
and the rollouts and wall-clock SFPO needs to reach each control's best.

    python benchmarks/sfpo_vs_grpo.py --seeds 3 --task basic_arithmetic [--rl-steps 40]

One SFT warm start (the demo's pipeline: SentencePiece tokenizer, `sfpo-megatron pretrain` under
torchrun, HF export), then per seed three runs from it with that seed, side by side: GRPO (one
optimizer pass over each rollout batch), GRPO with `--ppo-epochs K+1` ("grpo-e4" for K = 3: as
many optimizer steps per rollout batch as SFPO, no reposition) and SFPO (K fast passes, the
reposition, one slow pass). Settings are the demo's (`DemoConfig`), fixed in advance: the paper's
K = 3, alpha = 0.8, omega = 30, tau = 1 and the demo's documented learning rate.

Per seed and in aggregate, against each control: best validation accuracy (SFPO minus the
control, mean and bootstrap 95 % CI), the rollouts and training wall-clock (evaluation excluded)
each needs to reach the control's best, and the step at which SFPO's entropy switch-off fired.
Aggregate ratios are ratios of means over the seeds where SFPO reached the control's best, with
percentile-bootstrap 95 % CIs (seeds resampled), and say in words when a CI includes 1. The arms
of a seed share the machine's cores, so an arm's wall-clock includes waiting for the others:
rollouts are the primary measure.

Validation: `--eval-prompts` prompts x `--eval-samples` samples (avg@k at temperature 1,
top-p 0.7); the largest standard error of any single evaluation is reported and must stay below
1.5 points (the defaults, 1000 x 2, give about 1.2).

The same numbers for GRPO-E4 against GRPO (the extra passes alone): best-accuracy difference and
the rollouts and wall-clock each needs to reach GRPO's best, with bootstrap CIs.

Writes benchmarks/results/NAME.json and .png; work files under demo_out/bench_TASK/.
`--report-only` rebuilds them from the runs already in the work directory; `--from-json PATH`
from the curves in a results JSON this script wrote (nothing else needed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sfpo_megatron.demo.pipeline import (  # noqa: E402
    DemoConfig,
    Paths,
    Timer,
    rl_metrics,
    run_rl_arms,
    warm_start,
)
from sfpo_megatron.demo.report import (  # noqa: E402
    Curve,
    compare,
    curve_from_metrics,
    eval_standard_error,
    format_summary,
    plot_curves,
    read_metrics,
    summarize_seeds,
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
    p.add_argument("--seeds", type=int, default=3, help="RL seeds (runs per arm)")
    p.add_argument("--task", default="basic_arithmetic", choices=sorted(TASKS))
    p.add_argument("--rl-steps", type=int, default=40)
    p.add_argument("--eval-prompts", type=int, default=1000)
    p.add_argument("--eval-samples", type=int, default=2)
    p.add_argument("--eval-interval", type=int, default=5)
    p.add_argument("--work", default=None, help="work directory (default demo_out/bench_TASK)")
    p.add_argument("--reuse-warm-start", action="store_true",
                   help="skip the SFT warm start when WORK already holds one")
    p.add_argument("--name", default="sfpo_vs_grpo", help="results file stem")
    p.add_argument("--results", default=str(RESULTS), help="results directory (default benchmarks/results)")
    p.add_argument("--skip-done", action="store_true",
                   help="keep the seeds whose runs in WORK all reached --rl-steps (to add seeds)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: rebuild the results from the runs in WORK")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="run nothing: rebuild the results from the curves in a results JSON of "
                        "this script (its settings, timings and task summary are kept)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.seeds < 1:
        p.error(f"--seeds must be >= 1, got {a.seeds}")
    return a


def max_standard_error(curve, n_prompts: int, k: int) -> float:
    passes = curve.pass_at_k or [None] * len(curve.accuracy)
    return max(eval_standard_error(acc, n_prompts, k, pk) for acc, pk in zip(curve.accuracy, passes))


def finished(cfg: DemoConfig, metrics: dict[str, Path]) -> bool:
    """Every arm's run logged its last step."""
    return all(path.exists() and any(r.get("iteration") == cfg.rl_steps for r in read_metrics(path))
               for path in metrics.values())


def seed_result(cfg: DemoConfig, metrics: dict[str, Path] | dict[str, Curve], seed: int) -> tuple[dict, list]:
    """One seed's curves (from its runs' metrics files, or given) and SFPO's comparison with each
    control."""
    curves = {arm: m if isinstance(m, Curve) else curve_from_metrics(read_metrics(m), f"{arm.upper()} seed {seed}")
              for arm, m in metrics.items()}
    controls = [arm for arm in cfg.arms if arm != "sfpo"]
    vs = {arm: compare(curves[arm], curves["sfpo"]) for arm in controls}
    result = {"seed": seed, "best": {arm: c.best for arm, c in curves.items()},
              "vs": {arm: c.as_dict() for arm, c in vs.items()},
              "curves": {arm: vars(c) for arm, c in curves.items()}}
    return result, list(curves.values())


def equal_steps_result(cfg: DemoConfig, per_seed: list[dict]) -> list[dict]:
    """Per seed, GRPO-E(K+1) against GRPO in ``summarize_seeds``'s form (GRPO-E(K+1) as subject)."""
    e = cfg.equal_steps_arm
    rows = []
    for s in per_seed:
        grpo, more = Curve(**s["curves"]["grpo"]), Curve(**s["curves"][e])
        rows.append({"seed": s["seed"], "best": {"grpo": grpo.best, e: more.best},
                     "vs": {"grpo": compare(grpo, more).as_dict()}})
    return rows


def report_from_json(a: argparse.Namespace) -> int:
    """--from-json: every number again from the JSON's curves."""
    old = json.loads(Path(a.from_json).read_text())
    # the settings as written (a work directory outside the repository was written as None)
    cfg = DemoConfig(**{**old["config"], "out": old["config"]["out"] or "."})
    per_seed, curves = [], []
    for s in old["seeds"]:
        seed_curves = {arm: Curve(**c) for arm, c in s["curves"].items()}
        result, cs = seed_result(cfg, seed_curves, s["seed"])
        per_seed.append(result)
        curves += cs
    return write_results(a, cfg, per_seed, curves, old["task"], old["timings"], old["total_wall_s"],
                         config=old["config"])


def write_results(a: argparse.Namespace, cfg: DemoConfig, per_seed: list[dict], curves: list,
                  task, timings: dict, total_wall_s: float, config: dict | None = None) -> int:
    max_se = max(max_standard_error(c, cfg.eval_prompts, cfg.eval_samples) for c in curves)
    agg = summarize_seeds(per_seed)
    passes = cfg.passes_per_batch
    report = format_summary(per_seed, agg, passes)
    e = cfg.equal_steps_arm
    equal_rows = equal_steps_result(cfg, per_seed)
    equal_agg = summarize_seeds(equal_rows, subject=e)
    report += ("\n\nThe extra passes alone, without SFPO:\n"
               + format_summary(equal_rows, equal_agg, passes, subject=e).split("\n\n", 1)[1])
    report += (f"\nlargest standard error of one evaluation: {100 * max_se:.2f} points"
               "\nwall-clock: the arms of a seed ran side by side on shared cores (each arm's seconds "
               "include waiting for the others)")
    print("\n" + report)
    if max_se >= SE_LIMIT:
        print(f"WARNING: an evaluation's standard error is {100 * max_se:.2f} points (limit 1.5): "
              "use more --eval-prompts / --eval-samples")
    results = Path(a.results)
    results.mkdir(parents=True, exist_ok=True)
    png = plot_curves(curves, results / f"{a.name}.png",
                      title=f"{cfg.task}: validation accuracy, {len(per_seed)} seeds per arm")
    if config is None:
        config = cfg.as_dict() | {"out": repo_relative(cfg.out)}  # no absolute paths in results
    out = {"config": config, "task": task, "arms": {arm: {"algorithm": m, "ppo_epochs": ep, "passes_per_batch": passes[arm]}
                                      for arm, (m, ep) in cfg.arms.items()},
           "seeds": per_seed, "aggregate": agg,
           "equal_steps_vs_grpo": {"arm": e, "seeds": [r["vs"]["grpo"] for r in equal_rows],
                                   "aggregate": equal_agg},
           "report": report.splitlines(),
           "max_eval_standard_error": max_se, "timings": timings,
           "total_wall_s": total_wall_s, "plot": repo_relative(png) or png.name}
    path = write_json_atomic(results / f"{a.name}.json", out)
    print(f"wrote {path} and {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.from_json:
        return report_from_json(a)
    cfg = DemoConfig(out=Path(a.work or REPO / "demo_out" / f"bench_{a.task}"), task=a.task,
                     rl_steps=a.rl_steps, eval_prompts=a.eval_prompts, eval_samples=a.eval_samples,
                     eval_interval=a.eval_interval)
    paths, timer = Paths(cfg.out), Timer()
    timings_file = paths.root / "timings.json"
    t0 = time.perf_counter()
    show = not a.no_progress
    if (a.report_only or a.reuse_warm_start) and timings_file.exists():
        timer.phases = json.loads(timings_file.read_text())  # the earlier phases' times
    warm_file = paths.root / "warm_start.json"
    if not a.report_only and not (a.reuse_warm_start and (paths.hf / "config.json").exists()):
        write_json_atomic(warm_file, {"task": warm_start(cfg, paths, timer, show), "timings": dict(timer.phases)})
    task = json.loads(warm_file.read_text())["task"] if warm_file.exists() else None
    per_seed, curves = [], []
    for seed in range(a.seeds):
        tag = f"_s{seed}"
        if a.report_only or (a.skip_done and finished(cfg, rl_metrics(cfg, paths, tag))):
            metrics = rl_metrics(cfg, paths, tag)
        else:
            metrics = run_rl_arms(cfg, paths, seed, timer, tag=tag, show_progress=show)
            write_json_atomic(timings_file, timer.phases)
        result, seed_curves = seed_result(cfg, metrics, seed)
        per_seed.append(result)
        curves += seed_curves
        print(f"seed {seed}: best " + ", ".join(f"{arm.upper()} {100 * b:.1f} %"
                                                for arm, b in result["best"].items()), flush=True)
    total = (sum(t["wall_s"] for t in timer.phases.values()) if a.report_only
             else time.perf_counter() - t0)
    return write_results(a, cfg, per_seed, curves, task, timer.phases, total)


if __name__ == "__main__":  # the phases spawn processes: keep the guard
    sys.exit(main())
