"""tools/paper_table.py: two small metrics.jsonl files (a GRPO and an SFPO run, with iterations
without evaluation and a resumed run's repeated line) -> the paper's Table 1 layout. The expected
tables are worked out by hand from the numbers below."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launch import PYTHON, TOOLS, child_env, load_module, run

TOOL = TOOLS / "paper_table.py"
paper_table = load_module(TOOL)

GRPO = [
    {"iteration": 0, "eval/math500/avg@4": 0.5, "eval/aime24/avg@4": 0.1, "eval/average": 0.3},
    {"iteration": 1, "actor/pg_loss": 0.1},
    {"iteration": 2, "eval/math500/avg@4": 0.7, "eval/aime24/avg@4": 0.2},  # average 45 %: best
    {"iteration": 4, "eval/math500/avg@4": 0.6, "eval/aime24/avg@4": 0.2},  # replaced by the resume
    {"iteration": 3, "actor/pg_loss": 0.2},
    {"iteration": 4, "eval/math500/avg@4": 0.65, "eval/aime24/avg@4": 0.15},  # average 40 %
]
SFPO = [
    {"iteration": 0, "eval/math500/avg@4": 0.5, "eval/aime24/avg@4": 0.1},
    {"iteration": 2, "eval/math500/avg@4": 0.72, "eval/aime24/avg@4": 0.3},  # 51 %: best
    {"iteration": 4, "eval/math500/avg@4": 0.74, "eval/aime24/avg@4": 0.7 / 3},  # 48.67 %
]


def write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def runs(tmp_path: Path) -> tuple[str, str]:
    # The SFPO run is given as its log directory.
    return str(write(tmp_path / "grpo.jsonl", GRPO)), str(write(tmp_path / "sfpo" / "metrics.jsonl", SFPO).parent)


def tool(*argv: str, check: bool = True):
    return run([PYTHON, str(TOOL), *argv], check=check, env=child_env())


def test_default_is_each_runs_last_evaluation_as_markdown(runs) -> None:
    out = tool(*runs)
    assert out.stdout == (
        "avg@4 (%), each run at the last evaluation\n"
        "\n"
        "| method | iteration | math500 | aime24 | average |\n"
        "| --- | ---: | ---: | ---: | ---: |\n"
        "| GRPO | 4 | 65.00 | 15.00 | 40.00 |\n"
        "| SFPO | 4 | 74.00 | 23.33 | 48.67 |\n"
        "| Δ (SFPO − GRPO) |  | +9.00 | +8.33 | +8.67 |\n")


def test_best_picks_each_runs_highest_average_as_json(runs) -> None:
    table = json.loads(tool(*runs, "--at", "best", "--json").stdout)
    assert table["k"] == 4 and table["at"] == "best" and table["benchmarks"] == ["math500", "aime24"]
    g, s = table["runs"]["GRPO"], table["runs"]["SFPO"]
    assert g["iteration"] == 2 and s["iteration"] == 2
    assert g["scores"] == pytest.approx({"math500": 70.0, "aime24": 20.0})
    assert s["scores"] == pytest.approx({"math500": 72.0, "aime24": 30.0})
    assert (g["average"], s["average"]) == (pytest.approx(45.0), pytest.approx(51.0))
    assert table["delta"]["scores"] == pytest.approx({"math500": 2.0, "aime24": 10.0})
    assert table["delta"]["average"] == pytest.approx(6.0)


def test_an_iteration_and_a_chosen_subset_in_order(runs, capsys) -> None:
    assert paper_table.main([*runs, "--at", "0", "--benchmarks", "aime24"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "avg@4 (%), each run at iteration 0"
    assert lines[4:] == ["| GRPO | 0 | 10.00 | 10.00 |", "| SFPO | 0 | 10.00 | 10.00 |",
                         "| Δ (SFPO − GRPO) |  | +0.00 | +0.00 |"]
    assert paper_table.main([*runs, "--benchmarks", "aime24,math500"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| method | iteration | aime24 | math500 | average |"
    assert lines[5] == "| SFPO | 4 | 23.33 | 74.00 | 48.67 |"


@pytest.mark.parametrize(("change", "argv", "message"), [
    (None, ["--at", "3"], "GRPO run has no evaluation of math500, aime24 at iteration 3 (evaluated: 0, 2, 4)"),
    (None, ["--at", "first"], "--at must be last, best or an iteration number, got 'first'"),
    (None, ["--benchmarks", "math500,amc"], "GRPO run: no evaluation covers all of math500, amc"),
    ([{"iteration": 1, "loss": 1.0}], [], "{sfpo}: no eval metrics (eval/NAME/avg@k); run with "
                                           "--eval-prompt-data and --eval-interval"),
    ([{"iteration": 2, "eval/math500/avg@8": 0.5, "eval/aime24/avg@8": 0.1}], [],
     "the runs evaluated different k: GRPO avg@4, SFPO avg@8"),
    ([{"iteration": 2, "eval/math500/avg@4": 0.5, "eval/amc/avg@4": 0.1}], [],
     "the runs evaluated different sets: GRPO aime24, math500; SFPO amc, math500 (choose with --benchmarks)"),
    ([{"iteration": 2, "eval/math500/avg@4": 0.5}, {"iteration": 4, "eval/math500/avg@2": 0.5}], [],
     "{sfpo}: eval metrics for several k (avg@2, avg@4)"),
])
def test_errors_are_one_line_exit_2(tmp_path: Path, runs, change, argv, message) -> None:
    grpo, sfpo = runs
    if change is not None:
        sfpo = str(write(tmp_path / "other.jsonl", change))
    out = tool(grpo, sfpo, *argv, check=False)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"paper_table: error: {message.format(sfpo=sfpo)}\n"


def test_missing_file_and_bad_line(tmp_path: Path, runs, capsys) -> None:
    grpo, _ = runs
    assert paper_table.main([grpo, str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"paper_table: error: {tmp_path / 'nowhere'}: no such metrics file\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"iteration": 0}\n{not json\n')
    assert paper_table.main([grpo, str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"paper_table: error: {bad}:2: not JSON (")
