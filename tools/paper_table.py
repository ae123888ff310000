"""The eval metrics of a GRPO run and an SFPO run -> the layout of the SFPO paper's Table 1.

    python tools/paper_table.py GRPO_METRICS SFPO_METRICS [--at last|best|N] [--json]
                                [--benchmarks math500,aime24,...]

``GRPO_METRICS`` / ``SFPO_METRICS``: a run's ``metrics.jsonl`` (or the ``--log-dir`` holding it).
Each benchmark ``NAME`` is an ``--eval-prompt-data NAME=SPEC`` set, read from ``eval/NAME/avg@k``
(the paper reports avg@4: ``--n-samples-per-eval-prompt 4``). Output, in percent:

| method | iteration | math500 | aime24 | average |
| --- | ---: | ---: | ---: | ---: |
| GRPO | 400 | 72.35 | 10.00 | 41.18 |
| SFPO | 400 | 74.00 | 13.33 | 43.67 |
| Δ (SFPO − GRPO) |  | +1.65 | +3.33 | +2.49 |

``average`` is the unweighted mean of the benchmarks' avg@k (the paper's "average", the runs'
``eval/average``); the delta is taken before rounding. Columns follow ``--benchmarks`` (names, in
order; a subset is averaged over itself), else the GRPO run's order.

Which evaluation (``--at``), chosen for each run on its own:

* ``last`` (default): the run's last evaluation — the trained policy, no selection on the
  test sets;
* ``best``: the evaluation with the highest average (earliest on ties) — the best-checkpoint
  reading, optimistic because it selects on the test sets themselves;
* ``N``: iteration N, which both runs must have evaluated.

When a resumed run logged an iteration twice, its last line counts. ``--json`` prints
``{"k", "at", "benchmarks", "runs": {"GRPO"|"SFPO": {"iteration", "scores", "average"}},
"delta": {"scores", "average"}}`` with the same percentages, unrounded. Errors are one line,
``paper_table: error: ...``, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

_AVG = re.compile(r"^eval/(?P<name>.+)/avg@(?P<k>\d+)$")
METHODS = ("GRPO", "SFPO")


class TableError(ValueError):
    """Input the table cannot be made from; the message names the file and what is missing."""


def read_evaluations(path: str | Path) -> tuple[int, dict[int, dict[str, float]]]:
    """(k, {iteration: {benchmark: avg@k}}) of one run's metrics.jsonl (or its directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise TableError(f"{path}: no such metrics file")
    evals: dict[int, dict[str, float]] = {}
    ks: set[int] = set()
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TableError(f"{path}:{lineno}: not JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise TableError(f"{path}:{lineno}: not a JSON object")
        scores = {}
        for key, value in row.items():
            m = _AVG.match(key)
            if m:
                ks.add(int(m["k"]))
                scores[m["name"]] = float(value)
        if scores:
            if "iteration" not in row:
                raise TableError(f"{path}:{lineno}: eval metrics without an iteration")
            evals[int(row["iteration"])] = scores  # a resumed run's later line wins
    if not evals:
        raise TableError(f"{path}: no eval metrics (eval/NAME/avg@k); run with --eval-prompt-data "
                         "and --eval-interval")
    if len(ks) > 1:
        raise TableError(f"{path}: eval metrics for several k ({', '.join(f'avg@{k}' for k in sorted(ks))})")
    return ks.pop(), evals


def _average(scores: dict[str, float], benchmarks: list[str]) -> float:
    return sum(scores[b] for b in benchmarks) / len(benchmarks)


def _pick(label: str, evals: dict[int, dict[str, float]], benchmarks: list[str], at: str) -> int:
    complete = sorted(i for i, s in evals.items() if all(b in s for b in benchmarks))
    if not complete:
        raise TableError(f"{label} run: no evaluation covers all of {', '.join(benchmarks)}")
    if at == "last":
        return complete[-1]
    if at == "best":
        return max(complete, key=lambda i: (_average(evals[i], benchmarks), -i))
    n = int(at)
    if n not in complete:
        raise TableError(f"{label} run has no evaluation of {', '.join(benchmarks)} at iteration {n} "
                         f"(evaluated: {', '.join(map(str, complete))})")
    return n


def build_table(grpo: str | Path, sfpo: str | Path, at: str = "last",
                benchmarks: list[str] | None = None) -> dict[str, Any]:
    """The table's numbers (percent), as ``--json`` prints them."""
    if at not in ("last", "best") and not re.fullmatch(r"\d+", at):
        raise TableError(f"--at must be last, best or an iteration number, got {at!r}")
    runs = {"GRPO": read_evaluations(grpo), "SFPO": read_evaluations(sfpo)}
    (k_grpo, evals_grpo), (k_sfpo, evals_sfpo) = runs["GRPO"], runs["SFPO"]
    if k_grpo != k_sfpo:
        raise TableError(f"the runs evaluated different k: GRPO avg@{k_grpo}, SFPO avg@{k_sfpo}")
    if benchmarks is None:
        names = [list(evals[max(evals)]) for evals in (evals_grpo, evals_sfpo)]
        if set(names[0]) != set(names[1]):
            raise TableError(f"the runs evaluated different sets: GRPO {', '.join(sorted(names[0]))}; "
                             f"SFPO {', '.join(sorted(names[1]))} (choose with --benchmarks)")
        benchmarks = names[0]
    if not benchmarks or len(set(benchmarks)) != len(benchmarks):
        raise TableError(f"--benchmarks must name distinct sets, got {','.join(benchmarks)!r}")
    out: dict[str, Any] = {"k": k_grpo, "at": at, "benchmarks": list(benchmarks), "runs": {}}
    for label, (_, evals) in runs.items():
        it = _pick(label, evals, benchmarks, at)
        scores = {b: 100.0 * evals[it][b] for b in benchmarks}
        out["runs"][label] = {"iteration": it, "scores": scores, "average": _average(scores, benchmarks)}
    g, s = out["runs"]["GRPO"], out["runs"]["SFPO"]
    out["delta"] = {"scores": {b: s["scores"][b] - g["scores"][b] for b in benchmarks},
                    "average": s["average"] - g["average"]}
    return out


def to_markdown(table: dict[str, Any]) -> str:
    bench = table["benchmarks"]
    where = {"last": "the last evaluation", "best": "the best evaluation (highest average)"}.get(
        table["at"], f"iteration {table['at']}")
    lines = [f"avg@{table['k']} (%), each run at {where}", "",
             "| method | iteration | " + " | ".join(bench) + " | average |",
             "| --- | ---: | " + " | ".join("---:" for _ in bench) + " | ---: |"]
    for label in METHODS:
        r = table["runs"][label]
        cells = [f"{r['scores'][b]:.2f}" for b in bench] + [f"{r['average']:.2f}"]
        lines.append(f"| {label} | {r['iteration']} | " + " | ".join(cells) + " |")
    d = table["delta"]
    cells = [f"{d['scores'][b]:+.2f}" for b in bench] + [f"{d['average']:+.2f}"]
    lines.append("| Δ (SFPO − GRPO) |  | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("grpo", help="the GRPO run's metrics.jsonl (or its --log-dir)")
    p.add_argument("sfpo", help="the SFPO run's metrics.jsonl (or its --log-dir)")
    p.add_argument("--at", default="last", help="last (default) | best | an iteration N")
    p.add_argument("--benchmarks", default=None, help="comma-separated eval set names, in column order")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON instead")
    a = p.parse_args(argv)
    try:
        table = build_table(a.grpo, a.sfpo, a.at,
                            None if a.benchmarks is None else [b.strip() for b in a.benchmarks.split(",")])
    except TableError as e:
        print(f"paper_table: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(table, indent=2) if a.json else to_markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
