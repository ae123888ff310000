"""Validation curves of RL runs → the GRPO-vs-SFPO comparison, its table and its plot.

Shared by the demo (`python -m sfpo_megatron.demo`) and `benchmarks/sfpo_vs_grpo.py`.

A `Curve` is one run's validation accuracy at each evaluation, against the rollouts (sampled
responses, prompts x samples per prompt) and the training wall-clock spent so far. Wall-clock
counts the RL steps only, evaluation time excluded, so runs that evaluate equally often compare
fairly. "Rollouts to reach GRPO's best" follows the paper: GRPO's best validation accuracy is the
target; GRPO needs the rollouts of its first evaluation at that accuracy, SFPO the rollouts of
its first evaluation at or above it (None when it never gets there).
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


@dataclass
class Comparison:
    grpo_best: float
    sfpo_best: float
    grpo_rollouts: int  # GRPO's rollouts to its best
    grpo_wall_s: float
    sfpo_rollouts: int | None  # SFPO's rollouts to GRPO's best (None: never reached)
    sfpo_wall_s: float | None
    sfpo_trigger_step: int | None

    @property
    def rollout_ratio(self) -> float | None:
        """GRPO rollouts / SFPO rollouts to GRPO's best (> 1: SFPO needs fewer). None when SFPO
        never reaches it, or when GRPO's best is the warm start itself (both need 0)."""
        if not self.sfpo_rollouts:
            return None
        return self.grpo_rollouts / self.sfpo_rollouts

    @property
    def time_ratio(self) -> float | None:
        if not self.sfpo_wall_s or not self.sfpo_rollouts:
            return None
        return self.grpo_wall_s / self.sfpo_wall_s

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rollout_ratio": self.rollout_ratio, "time_ratio": self.time_ratio}


def compare(grpo: Curve, sfpo: Curve) -> Comparison:
    target = grpo.best
    g = grpo.first_reaching(target)
    assert g is not None  # its own maximum
    s = sfpo.first_reaching(target)
    return Comparison(
        grpo_best=target, sfpo_best=sfpo.best,
        grpo_rollouts=grpo.rollouts[g], grpo_wall_s=grpo.wall_s[g],
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


def format_table(grpo: Curve, sfpo: Curve, comparison: Comparison | None = None) -> str:
    """Validation accuracy at each evaluation of both runs, then the comparison lines."""
    comparison = comparison or compare(grpo, sfpo)
    rows = sorted(set(grpo.steps) | set(sfpo.steps))
    g = dict(zip(grpo.steps, zip(grpo.rollouts, grpo.accuracy)))
    s = dict(zip(sfpo.steps, zip(sfpo.rollouts, sfpo.accuracy)))
    lines = [f"{'step':>5} {'rollouts':>9} {'GRPO acc %':>11} {'SFPO acc %':>11}"]
    for step in rows:
        rollouts = (g.get(step) or s.get(step))[0]
        lines.append(f"{step:>5} {rollouts:>9,} {_pct(g.get(step, (0, None))[1]):>11} "
                     f"{_pct(s.get(step, (0, None))[1]):>11}")
    c = comparison
    ratio = "-" if c.rollout_ratio is None else f"{c.rollout_ratio:.2f}x"
    tratio = "-" if c.time_ratio is None else f"{c.time_ratio:.2f}x"
    if c.grpo_rollouts == 0:
        ratio = tratio = "n/a: GRPO never beat the warm start"
    trigger = "not fired" if c.sfpo_trigger_step is None else f"step {c.sfpo_trigger_step}"
    lines += [
        "",
        f"best validation accuracy: GRPO {_pct(c.grpo_best).strip()} %, SFPO {_pct(c.sfpo_best).strip()} %",
        f"rollouts to reach GRPO's best ({_pct(c.grpo_best).strip()} %): GRPO {_num(c.grpo_rollouts)}, "
        f"SFPO {_num(c.sfpo_rollouts)}  (GRPO/SFPO = {ratio})",
        f"training wall-clock to reach it: GRPO {_num(c.grpo_wall_s, '{:.0f} s')}, "
        f"SFPO {_num(c.sfpo_wall_s, '{:.0f} s')}  (GRPO/SFPO = {tratio})",
        f"SFPO entropy switch-off: {trigger}",
    ]
    return "\n".join(lines)


COLORS = {"grpo": "tab:blue", "sfpo": "tab:orange"}


def plot_curves(runs: Sequence[Curve], path: str | os.PathLike, title: str = "",
                target: float | None = None) -> Path:
    """Accuracy (%) against rollouts, one line per run (color by method); writes a PNG."""
    matplotlib.use("Agg")  # no display: write files only

    if not runs:
        raise ReportError("plot_curves needs at least one curve")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labelled: set[str] = set()
    for curve in runs:
        method = curve.method.split(" ")[0].lower()
        label = curve.method if len(runs) <= 2 else (method.upper() if method not in labelled else None)
        labelled.add(method)
        ax.plot(curve.rollouts, [100 * a for a in curve.accuracy], marker="o", markersize=3,
                color=COLORS.get(method), alpha=1.0 if len(runs) <= 2 else 0.6, label=label)
    if target is not None:
        ax.axhline(100 * target, color="gray", linestyle="--", linewidth=1, label="GRPO best")
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
