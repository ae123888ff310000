"""Validation curves of RL runs → SFPO against its GRPO controls: the comparison, its table and its plot.

Shared by the demo (`python -m sfpo_megatron.demo`) and `benchmarks/sfpo_vs_grpo.py`.

A `Curve` is one run's validation accuracy at each evaluation, against the rollouts (sampled
responses, prompts x samples per prompt) and the training wall-clock spent so far. Wall-clock
counts the RL steps only, evaluation time excluded, so runs that evaluate equally often compare
fairly. "Rollouts to reach a control's best" follows the paper's "rollouts to reach GRPO's
best": the control's best validation accuracy is the target; the control needs the rollouts of
its first evaluation at that accuracy, SFPO the rollouts of its first evaluation at or above it
(None when it never gets there). There are two controls: GRPO (one optimizer pass over each
rollout batch) and GRPO with K + 1 passes (`--ppo-epochs K+1`, "grpo-eK+1"), which takes as many
optimizer steps per rollout batch as SFPO and differs from it only by the reposition (and the
entropy switch-off). Against the first, SFPO's gain mixes the extra passes and the reposition;
against the second, it is the reposition's.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from sfpo_megatron.errors import UserError


class ReportError(UserError):
    """Metrics that do not make a validation curve (no evaluations, mismatched lengths)."""


@dataclass
class Curve:
    """One run: parallel lists, one entry per evaluation (step 0 = the warm start)."""

    method: str
    steps: list[int]
    rollouts: list[int]
    accuracy: list[float]
    wall_s: list[float]
    pass_at_k: list[float] = field(default_factory=list)
    trigger_step: int | None = None  # SFPO's entropy switch-off (first step run as GRPO)

    def __post_init__(self) -> None:
        n = len(self.steps)
        if n == 0:
            raise ReportError(f"curve {self.method!r} has no evaluations")
        for name in ("rollouts", "accuracy", "wall_s"):
            if len(getattr(self, name)) != n:
                raise ReportError(f"curve {self.method!r}: {name} has {len(getattr(self, name))} "
                                  f"entries for {n} evaluations")

    @property
    def best(self) -> float:
        return max(self.accuracy)

    def first_reaching(self, target: float) -> int | None:
        """Index of the first evaluation with accuracy >= target, or None."""
        for i, acc in enumerate(self.accuracy):
            if acc >= target - 1e-12:  # the same evaluation number must count as reached
                return i
        return None


def curve_from_metrics(records: Iterable[Mapping[str, Any]], method: str,
                       eval_name: str | None = None) -> Curve:
    """Build a curve from an RL run's `metrics.jsonl` records (`sfpo-megatron rl`).

    Uses `eval/NAME/avg@k` (the accuracy for 0/1 rewards), cumulative `rollout/num_samples`,
    cumulative `time/step_s - time/eval_s`, and SFPO's `sfpo/trigger_step` (-1 = not fired).
    """
    records = sorted(records, key=lambda r: r["iteration"])
    key = None
    rollouts, wall, trigger = 0, 0.0, None
    steps, rolls, accs, walls, passes = [], [], [], [], []
    for rec in records:
        rollouts += int(rec.get("rollout/num_samples", 0))
        if "time/step_s" in rec:  # step 0 (the warm start's evaluation) has no training time
            wall += float(rec["time/step_s"]) - float(rec.get("time/eval_s", 0.0))
        fired = rec.get("sfpo/trigger_step")
        if fired is not None and fired >= 0 and trigger is None:
            trigger = int(fired)
        key = key or _eval_key(rec, eval_name)
        if key is not None and key in rec:
            steps.append(int(rec["iteration"]))
            rolls.append(rollouts)
            accs.append(float(rec[key]))
            walls.append(wall)
            pass_key = key.replace("/avg@", "/pass@")
            if pass_key in rec:
                passes.append(float(rec[pass_key]))
    if key is None:
        raise ReportError(f"run {method!r}: no eval/{eval_name or '*'}/avg@k metric in its records")
    return Curve(method, steps, rolls, accs, walls, passes, trigger)


def _eval_key(rec: Mapping[str, Any], eval_name: str | None) -> str | None:
    keys = sorted(k for k in rec if k.startswith("eval/") and "/avg@" in k
                  and (eval_name is None or k.split("/")[1] == eval_name))
    return keys[0] if keys else None


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """``data`` as indented JSON at ``path``, via a temporary file and a rename (never half written)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------------------
# The comparison
# ------------------------------------------------------------------------------------------------


def arm_of(curve: Curve) -> str:
    """The arm a curve belongs to: the first word of its label, lower case ("GRPO-E4 seed 1" → "grpo-e4")."""
    return curve.method.split(" ")[0].lower()


@dataclass
class Comparison:
    """SFPO against one control arm (GRPO, or GRPO with SFPO's number of passes)."""

    control: str  # the control arm ("grpo", "grpo-e4")
    control_best: float
    sfpo_best: float
    control_rollouts: int  # the control's rollouts to its best
    control_wall_s: float
    sfpo_rollouts: int | None  # SFPO's rollouts to the control's best (None: never reached)
    sfpo_wall_s: float | None
    sfpo_trigger_step: int | None

    @property
    def rollout_ratio(self) -> float | None:
        """Control rollouts / SFPO rollouts to the control's best (> 1: SFPO needs fewer). None when
        SFPO never reaches it, or when the control's best is the warm start itself (both need 0)."""
        if not self.sfpo_rollouts:
            return None
        return self.control_rollouts / self.sfpo_rollouts

    @property
    def time_ratio(self) -> float | None:
        if not self.sfpo_wall_s or not self.sfpo_rollouts:
            return None
        return self.control_wall_s / self.sfpo_wall_s

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rollout_ratio": self.rollout_ratio, "time_ratio": self.time_ratio}


def compare(control: Curve, sfpo: Curve) -> Comparison:
    """Rollouts and wall-clock each run needs to reach the control's best accuracy."""
    target = control.best
    g = control.first_reaching(target)
    assert g is not None  # its own maximum
    s = sfpo.first_reaching(target)
    return Comparison(
        control=arm_of(control), control_best=target, sfpo_best=sfpo.best,
        control_rollouts=control.rollouts[g], control_wall_s=control.wall_s[g],
        sfpo_rollouts=None if s is None else sfpo.rollouts[s],
        sfpo_wall_s=None if s is None else sfpo.wall_s[s],
        sfpo_trigger_step=sfpo.trigger_step)


def eval_standard_error(accuracy: float, n_prompts: int, k: int, pass_at_k: float | None = None) -> float:
    """Standard error of one evaluation's avg@k over `n_prompts` prompts (prompts resampled).

    What matters is the variance of a prompt's mean over its k samples. For k = 1 it is
    p(1 - p). For k = 2 it follows exactly from avg@2 and pass@2: a prompt's mean is 1 for a
    fraction 2 avg - pass of the prompts, 1/2 for 2 (pass - avg) and 0 for the rest. For larger
    k, p(1 - p) is an upper bound (samples of one prompt at most fully correlated).
    """
    if n_prompts < 1 or k < 1:
        raise ReportError(f"need n_prompts >= 1 and k >= 1, got {n_prompts} and {k}")
    p = accuracy
    var = p * (1.0 - p)
    if k == 2 and pass_at_k is not None:
        both = 2.0 * p - pass_at_k  # fraction of prompts with 2 correct samples
        one = 2.0 * (pass_at_k - p)  # fraction with exactly one
        var = max(both + one / 4.0 - p * p, 0.0)
    return math.sqrt(var / n_prompts)


# ------------------------------------------------------------------------------------------------
# Output: table and plot
# ------------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100.0 * x:5.1f}"


def _num(x: float | None, fmt: str = "{:,.0f}") -> str:
    return "never" if x is None else fmt.format(x)


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _passes(passes: Mapping[str, int] | None, control: str, subject: str = "sfpo") -> str:
    """" (1 vs 4 optimizer passes per rollout batch)", naming equal optimizer steps."""
    if passes is None:
        return ""
    same = ", the same optimizer steps" if passes[control] == passes[subject] else ""
    return f" ({passes[control]} vs {passes[subject]} optimizer passes per rollout batch{same})"


def describe_ci(lo: float, hi: float, null: float, above: str, below: str) -> str:
    """Plain words for a 95 % CI against the no-difference value ``null`` (1 for a ratio, 0 for a
    difference): the CI's side of it, or that it includes it (no difference shown)."""
    if lo <= null <= hi:
        return f"the 95 % CI includes {null:g}: no difference shown"
    return above if lo > null else below


def format_table(curves: Mapping[str, Curve], comparisons: Sequence[Comparison],
                 passes: Mapping[str, int] | None = None, notes: Sequence[str] = ()) -> str:
    """Validation accuracy of every arm at each evaluation, then SFPO against each control.

    ``curves``: {arm: curve}, SFPO's under "sfpo"; ``passes``: optimizer passes over a rollout
    batch per arm, for the labels; ``notes``: lines appended as they are.
    """
    arms = list(curves)
    rows = sorted(set().union(*(c.steps for c in curves.values())))
    by_step = {a: dict(zip(c.steps, zip(c.rollouts, c.accuracy))) for a, c in curves.items()}
    lines = [f"{'step':>5} {'rollouts':>9} " + " ".join(f"{a.upper() + ' acc %':>13}" for a in arms)]
    for step in rows:
        rollouts = next(by_step[a][step][0] for a in arms if step in by_step[a])
        lines.append(f"{step:>5} {rollouts:>9,} " + " ".join(
            f"{_pct(by_step[a].get(step, (0, None))[1]):>13}" for a in arms))
    best = ", ".join(f"{a.upper()} {_pct(c.best).strip()} %" for a, c in curves.items())
    lines += ["", f"best validation accuracy: {best}"]
    trigger = None
    for c in comparisons:
        name = c.control.upper()
        ratio, tratio = _ratio(c.rollout_ratio), _ratio(c.time_ratio)
        if c.control_rollouts == 0:
            ratio = tratio = f"n/a: {name} never beat the warm start"
        what = _passes(passes, c.control)
        lines += [
            f"SFPO vs {name}{what}:",
            f"  rollouts to reach {name}'s best ({_pct(c.control_best).strip()} %): {name} "
            f"{_num(c.control_rollouts)}, SFPO {_num(c.sfpo_rollouts)}  ({name}/SFPO = {ratio})",
            f"  training wall-clock to reach it: {name} {_num(c.control_wall_s, '{:.0f} s')}, "
            f"SFPO {_num(c.sfpo_wall_s, '{:.0f} s')}  ({name}/SFPO = {tratio})",
        ]
        trigger = c.sfpo_trigger_step
    if comparisons:
        lines.append(f"SFPO entropy switch-off: {'not fired' if trigger is None else f'step {trigger}'}")
    return "\n".join(lines + list(notes))


COLORS = {"grpo": "tab:blue", "sfpo": "tab:orange"}
OTHER_COLORS = ("tab:green", "tab:purple", "tab:brown")


def plot_curves(runs: Sequence[Curve], path: str | os.PathLike, title: str = "",
                targets: Mapping[str, float] | None = None) -> Path:
    """Accuracy (%) against rollouts, one line per run (color by arm); ``targets``: dashed
    horizontal lines {label: accuracy}, e.g. each control's best; writes a PNG."""
    matplotlib.use("Agg")  # no display: write files only

    if not runs:
        raise ReportError("plot_curves needs at least one curve")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    arms = list(dict.fromkeys(arm_of(c) for c in runs))
    colors = dict(COLORS)
    for arm, color in zip([a for a in arms if a not in colors], OTHER_COLORS):
        colors[arm] = color
    one_each = len(runs) == len(arms)
    labelled: set[str] = set()
    for curve in runs:
        arm = arm_of(curve)
        label = curve.method if one_each else (arm.upper() if arm not in labelled else None)
        labelled.add(arm)
        ax.plot(curve.rollouts, [100 * a for a in curve.accuracy], marker="o", markersize=3,
                color=colors.get(arm), alpha=1.0 if one_each else 0.6, label=label)
    for (label, target), style in zip((targets or {}).items(), ("--", ":", "-.")):
        ax.axhline(100 * target, color="gray", linestyle=style, linewidth=1, label=label)
    ax.set_xlabel("rollouts (sampled responses)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# Across seeds (the benchmark)
# ------------------------------------------------------------------------------------------------


def bootstrap_ratio_ci(numerators: Sequence[float], denominators: Sequence[float],
                       n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Ratio of means sum(num)/sum(den) over seeds and its percentile bootstrap CI (seeds resampled)."""
    num, den = np.asarray(numerators, float), np.asarray(denominators, float)
    if num.shape != den.shape or num.size == 0:
        raise ReportError(f"need matching, non-empty per-seed values, got {num.size} and {den.size}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, num.size, size=(n_boot, num.size))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = num[idx].sum(1) / den[idx].sum(1)
    lo, hi = np.quantile(ratios, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(num.sum() / den.sum()), float(lo), float(hi)


def bootstrap_mean_ci(values: Sequence[float], n_boot: int = 10_000, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float, float]:
    """Mean over seeds and its percentile bootstrap CI (seeds resampled)."""
    # the ratio of sums with every denominator 1 is sum / n, the mean
    return bootstrap_ratio_ci(values, [1.0] * len(values), n_boot, level, seed)


def _words(n: int, lo: float, hi: float, null: float, above: str, below: str) -> str:
    if n < 2:
        return "one seed: no confidence interval"
    return describe_ci(lo, hi, null, above, below)


def summarize_seeds(per_seed: Sequence[Mapping[str, Any]], subject: str = "sfpo") -> dict[str, Any]:
    """Aggregate of per-seed results ``{"seed", "best": {arm: acc}, "vs": {control: Comparison.as_dict()}}``.

    ``subject``: the arm compared with the controls (the ``sfpo_*`` fields of a Comparison are
    its numbers), SFPO unless another arm is compared, e.g. GRPO-E4 with GRPO.

    Per arm the mean best accuracy; per control, SFPO's best minus the control's (mean, bootstrap
    95 % CI) and the rollout and wall-clock ratios control / SFPO to the control's best: ratios of
    means over the seeds where SFPO reached it and the control beat the warm start, with
    bootstrap 95 % CIs and what the CI says in words.
    """
    if not per_seed:
        raise ReportError("no seeds to summarize")
    me = subject.upper()
    arms = list(per_seed[0]["best"])
    out: dict[str, Any] = {
        "seeds": len(per_seed),
        "best_mean": {a: float(np.mean([s["best"][a] for s in per_seed])) for a in arms},
        "sfpo_trigger_steps": [next(iter(s["vs"].values()))["sfpo_trigger_step"] for s in per_seed],
        "vs": {},
    }
    for control in per_seed[0]["vs"]:
        name = control.upper()
        rows = [s["vs"][control] for s in per_seed]
        diff, lo, hi = bootstrap_mean_ci([r["sfpo_best"] - r["control_best"] for r in rows])
        agg: dict[str, Any] = {
            "best_diff": {"mean": diff, "ci95": [lo, hi], "words": _words(
                len(rows), lo, hi, 0.0, f"{me}'s best is higher than {name}'s",
                f"{me}'s best is lower than {name}'s")},
            "seeds_control_beat_warm_start": sum(r["control_rollouts"] > 0 for r in rows),
            "seeds_sfpo_reached": sum(r["sfpo_rollouts"] is not None for r in rows),
        }
        used = [r for r in rows if r["sfpo_rollouts"]]  # reached, and not at the warm start
        agg["seeds_in_ratios"] = len(used)
        for key, num, den, less in (("rollout_ratio", "control_rollouts", "sfpo_rollouts", "fewer rollouts"),
                                    ("time_ratio", "control_wall_s", "sfpo_wall_s", "less wall-clock")):
            if used:
                more = "more rollouts" if key == "rollout_ratio" else "more wall-clock"
                point, lo, hi = bootstrap_ratio_ci([r[num] for r in used], [r[den] for r in used])
                agg[key] = {"ratio_of_means": point, "ci95": [lo, hi], "words": _words(
                    len(used), lo, hi, 1.0, f"{me} needs {less} than {name}", f"{me} needs {more} than {name}")}
        out["vs"][control] = agg
    return out


def format_summary(per_seed: Sequence[Mapping[str, Any]], agg: Mapping[str, Any],
                   passes: Mapping[str, int] | None = None, subject: str = "sfpo") -> str:
    """The benchmark's table: per seed, then means and ratios with their CIs in numbers and words
    (``subject`` as in :func:`summarize_seeds`)."""
    me = subject.upper()
    arms = list(per_seed[0]["best"])
    lines = ["best validation accuracy (%):",
             f"{'seed':>6} " + " ".join(f"{a.upper():>9}" for a in arms)]
    for s in per_seed:
        lines.append(f"{s['seed']:>6} " + " ".join(f"{100 * s['best'][a]:>9.1f}" for a in arms))
    lines.append(f"{'mean':>6} " + " ".join(f"{100 * agg['best_mean'][a]:>9.1f}" for a in arms))
    n = agg["seeds"]
    for control, c in agg["vs"].items():
        name = control.upper()
        what = _passes(passes, control, subject)
        lines += ["", f"{me} vs {name}{what}:",
                  f"{'seed':>6} {name + ' best':>13} {name + ' roll.':>13} {me + ' roll.':>10} "
                  f"{'ratio':>6} {name + ' s':>10} {me + ' s':>7} {'ratio':>6}"]
        for s in per_seed:
            r = s["vs"][control]
            lines.append(f"{s['seed']:>6} {100 * r['control_best']:>12.1f}% {_num(r['control_rollouts']):>13} "
                         f"{_num(r['sfpo_rollouts']):>10} {_ratio(r['rollout_ratio']):>6} "
                         f"{r['control_wall_s']:>10.0f} {_num(r['sfpo_wall_s']):>7} {_ratio(r['time_ratio']):>6}")
        d = c["best_diff"]
        lines.append(f"  best accuracy, {me} - {name}: {100 * d['mean']:+.1f} points (95 % CI "
                     f"{100 * d['ci95'][0]:+.1f} to {100 * d['ci95'][1]:+.1f}): {d['words']}")
        reached = f"  {me} reached {name}'s best in {c['seeds_sfpo_reached']} of {n} seeds"
        if c["seeds_sfpo_reached"] < n:
            reached += f" (the ratios below leave out the seeds where it never did: they favour {me})"
        lines.append(reached)
        for key, what in (("rollout_ratio", "rollouts"), ("time_ratio", "wall-clock")):
            if key in c:
                lo, hi = c[key]["ci95"]
                k = c["seeds_in_ratios"]
                lines.append(f"  {name}/{me} {what} to {name}'s best: {c[key]['ratio_of_means']:.2f}x "
                             f"(95 % CI {lo:.2f}-{hi:.2f}, {k} seed{'s' if k != 1 else ''}): {c[key]['words']}")
            else:
                lines.append(f"  {name}/{me} {what} to {name}'s best: no seed to compare")
    return "\n".join(lines)
