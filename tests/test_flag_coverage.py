"""Every option that ``sfpo-megatron {pretrain,rl,eval,plan} --help`` shows has a flag-to-behaviour case.

Tests declare the options whose effect they assert with ``@pytest.mark.flags("--a", "--b",
cmd="rl")`` (``cmd``: ``"pretrain"``, ``"rl"`` (the default) or ``"eval"``, or a tuple of them,
for a test that proves the effect under each). The declarations are read statically (``ast`` over
tests/*.py), so this check costs nothing. It fails when a declared option does not exist (a typo,
a removed flag) and when an option of a parser has neither a case nor an entry in ``EXCEPTIONS``
(with the reason). ``eval`` is built from ``rl``'s parser (cli.py), so a case for one covers the
other: the check asserts they still show the same options. ``plan`` is ``rl``'s parser plus its
own group (the job it plans is an ``rl`` job): ``rl``'s options keep ``rl``'s cases, ``plan``'s
own options need cases with ``cmd="plan"``.

``UNCOVERED`` names the options that still lack a case: the list only shrinks (an entry that
gains a case fails the check until it is removed).
"""

from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from sfpo_megatron.arguments import build_plan_parser, build_pretrain_parser, build_rl_parser

TESTS = Path(__file__).resolve().parent
# Commands whose parser is another's (cli.py builds `eval` from `rl`'s parser).
SAME_PARSER = {"eval": "rl"}
# Commands whose parser is another's plus options of their own: the base's options are the base's.
EXTENDS = {"plan": "rl"}
GPU_DOC = "GPU-only (Transformer Engine / SGLang / CUDA): validated per docs/gpu-validation.md"

# (command, option) → why it has no case in this test suite.
EXCEPTIONS: dict[tuple[str, str], str] = {
    **{(cmd, opt): GPU_DOC for cmd in ("pretrain", "rl")
       for opt in ("--transformer-impl", "--fp8-format", "--fp8-recipe", "--sequence-parallel")},
    ("rl", "--rollout-tp-size"): GPU_DOC,
    ("rl", "--rollout-mem-fraction"): GPU_DOC,
}

# (command, option) → what a case would have to show; options still without one.
UNCOVERED: dict[tuple[str, str], str] = {
}


@dataclass(frozen=True)
class Declaration:
    where: str  # file:line of the marker
    cmds: tuple[str, ...]
    flags: tuple[str, ...]


def cli_parsers() -> dict[str, argparse.ArgumentParser]:
    """The parsers cli.py builds for each subcommand (the ones `--help` prints)."""
    eval_parser = build_rl_parser()
    eval_parser.prog = "sfpo-megatron eval"
    return {"pretrain": build_pretrain_parser(), "rl": build_rl_parser(), "eval": eval_parser,
            "plan": build_plan_parser()}


def parser_options(parser: argparse.ArgumentParser) -> dict[str, tuple[str, ...]]:
    """Every option string of the parser (aliases included) → all strings of its action;
    -h/--help left out."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        for s in action.option_strings:
            out[s] = tuple(action.option_strings)
    return out


def _is_flags_marker(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "flags" and ast.unparse(node.func.value) == "pytest.mark")


def find_declarations(files: list[Path]) -> tuple[list[Declaration], list[str]]:
    """Every ``pytest.mark.flags(...)`` call in the files (decorators, ``pytestmark``,
    ``pytest.param(marks=...)``); its arguments must be literal strings."""
    found, problems = [], []
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not _is_flags_marker(node):
                continue
            where = f"{path.name}:{node.lineno}"
            try:
                flags = tuple(ast.literal_eval(a) for a in node.args)
                kw = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
            except ValueError:
                problems.append(f"{where}: pytest.mark.flags takes literal strings only")
                continue
            cmds = kw.pop("cmd", "rl")
            cmds = (cmds,) if isinstance(cmds, str) else tuple(cmds)
            if kw or not flags or not all(isinstance(f, str) for f in flags + cmds):
                problems.append(f"{where}: use pytest.mark.flags('--opt', ..., cmd='rl')")
                continue
            found.append(Declaration(where, cmds, flags))
    return found, problems


def coverage_problems(parsers: dict[str, argparse.ArgumentParser],
                      declarations: list[Declaration],
                      exceptions: dict[tuple[str, str], str],
                      uncovered: dict[tuple[str, str], str] | None = None) -> list[str]:
    """What is wrong with the coverage of ``parsers``' options: declared options that do not
    exist, options with no case and no exception, stale exception / uncovered entries."""
    uncovered = uncovered or {}
    problems = []
    options = {cmd: parser_options(p) for cmd, p in parsers.items()}
    owner = {cmd: SAME_PARSER.get(cmd, cmd) for cmd in parsers}
    for cmd, base in owner.items():
        if base != cmd and set(options[cmd]) != set(options.get(base, ())):
            problems.append(f"{cmd} no longer shows {base}'s options: give it its own cases")
    for cmd, base in EXTENDS.items():
        if cmd in options and not set(options.get(base, ())) <= set(options[cmd]):
            problems.append(f"{cmd} no longer shows all of {base}'s options: give it its own cases")

    def owner_of(cmd: str, action: tuple[str, ...]) -> str:
        base = EXTENDS.get(cmd)
        if base is not None and action[0] in options.get(base, {}):
            return base
        return owner[cmd]

    # Coverage is per (command, action): an alias covers its action.
    covered: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for d in declarations:
        for cmd in d.cmds:
            if cmd not in options:
                problems.append(f"{d.where}: unknown command {cmd!r} (one of {sorted(options)})")
                continue
            for flag in d.flags:
                action = options[cmd].get(flag)
                if action is None:
                    problems.append(f"{d.where}: {flag} is not an option of `sfpo-megatron {cmd}`")
                    continue
                covered.setdefault((owner_of(cmd, action), action), []).append(d.where)
    listed = {**exceptions, **uncovered}
    for key in listed:
        cmd, opt = key
        if cmd not in options or opt not in options[cmd]:
            problems.append(f"EXCEPTIONS/UNCOVERED names {opt} of {cmd}, which is not an option")
    for cmd, opts in options.items():
        if owner[cmd] != cmd:
            continue
        for action in dict.fromkeys(opts.values()):
            if owner_of(cmd, action) != cmd:
                continue
            keys = [(cmd, s) for s in action if (cmd, s) in listed]
            has_case = (cmd, action) in covered
            name = "/".join(action)
            if not has_case and not keys:
                problems.append(f"{name} (`sfpo-megatron {cmd}`) has no flag-to-behaviour case")
            elif has_case and keys and any(k in uncovered for k in keys):
                problems.append(f"{name} (`sfpo-megatron {cmd}`) has a case now "
                                f"({', '.join(covered[(cmd, action)])}): drop it from UNCOVERED")
            elif has_case and keys:
                problems.append(f"{name} (`sfpo-megatron {cmd}`) has a case "
                                f"({', '.join(covered[(cmd, action)])}) and an exception")
    return problems


def test_every_option_has_a_case() -> None:
    declarations, problems = find_declarations(sorted(TESTS.glob("*.py")))
    assert declarations, "no pytest.mark.flags declarations found"
    problems += coverage_problems(cli_parsers(), declarations, EXCEPTIONS, UNCOVERED)
    assert not problems, "\n".join(problems)


def test_marker_is_registered() -> None:
    """An unregistered marker would only warn; the declarations rely on the registered one."""
    text = (TESTS.parent / "pyproject.toml").read_text()
    assert '"flags(' in text


def _parsers_with(extra: str) -> dict[str, argparse.ArgumentParser]:
    parsers = cli_parsers()
    parsers["rl"].add_argument(extra, type=int, default=0)
    parsers["eval"].add_argument(extra, type=int, default=0)
    parsers["plan"].add_argument(extra, type=int, default=0)  # plan is built from rl's parser
    return parsers


def test_a_planted_option_without_a_case_is_reported(tmp_path: Path) -> None:
    declarations, _ = find_declarations(sorted(TESTS.glob("*.py")))
    before = coverage_problems(cli_parsers(), declarations, EXCEPTIONS, UNCOVERED)
    problems = coverage_problems(_parsers_with("--bogus-knob"), declarations, EXCEPTIONS,
                                 UNCOVERED)
    assert problems == before + ["--bogus-knob (`sfpo-megatron rl`) has no flag-to-behaviour case"]
    # A case for it (found by the same static scan) makes it pass; a typo in a case fails.
    case = tmp_path / "test_planted.py"
    case.write_text("import pytest\n\n\n@pytest.mark.flags('--bogus-knob', cmd=('rl', 'eval'))\n"
                    "def test_x():\n    pass\n\n\n"
                    "@pytest.mark.flags('--bogus-knbo')\ndef test_y():\n    pass\n")
    planted, bad = find_declarations([case])
    assert not bad and [d.cmds for d in planted] == [("rl", "eval"), ("rl",)]
    problems = coverage_problems(_parsers_with("--bogus-knob"), declarations + planted,
                                 EXCEPTIONS, UNCOVERED)
    assert problems == ["test_planted.py:9: --bogus-knbo is not an option of `sfpo-megatron rl`"] \
        + before


def test_stale_entries_and_eval_drift_are_reported() -> None:
    declarations, _ = find_declarations(sorted(TESTS.glob("*.py")))
    gone = {("rl", "--no-such-flag"): "x"}
    problems = coverage_problems(cli_parsers(), declarations, {**EXCEPTIONS, **gone}, UNCOVERED)
    assert "EXCEPTIONS/UNCOVERED names --no-such-flag of rl, which is not an option" in problems
    parsers = cli_parsers()
    parsers["eval"].add_argument("--eval-only", action="store_true")
    problems = coverage_problems(parsers, declarations, EXCEPTIONS, UNCOVERED)
    assert "eval no longer shows rl's options: give it its own cases" in problems
    # plan's own options need plan cases: a new one without is reported under plan.
    parsers = cli_parsers()
    parsers["plan"].add_argument("--plan-only", action="store_true")
    problems = coverage_problems(parsers, declarations, EXCEPTIONS, UNCOVERED)
    assert "--plan-only (`sfpo-megatron plan`) has no flag-to-behaviour case" in problems


@pytest.mark.parametrize("source, message", [
    ("pytest.mark.flags(FLAG)", "pytest.mark.flags takes literal strings only"),
    ("pytest.mark.flags('--lr', cmds='rl')", "use pytest.mark.flags('--opt', ..., cmd='rl')"),
])
def test_malformed_declarations_are_reported(tmp_path: Path, source: str, message: str) -> None:
    case = tmp_path / "test_bad.py"
    case.write_text(f"import pytest\n\nx = {source}\n")
    assert find_declarations([case]) == ([], [f"test_bad.py:3: {message}"])
