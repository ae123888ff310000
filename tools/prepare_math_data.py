"""Public math datasets (downloaded by you) -> the JSONL that ``--prompt-data`` / ``--eval-prompt-data`` read.

    python tools/prepare_math_data.py --dataset math500 --input ~/hf/MATH-500 --output data/math500.jsonl

Each output line is ``{"prompt": ..., "answer": ..., "problem": ..., "source": ..., "id": ...}``:
``prompt`` is the problem in the prompt template (default ``sfpo``: the SFPO reference code's
"Please solve the following math problem: ... Return the final answer in \\boxed{} tags ..."),
``answer`` the ground truth as a string (what the math reward compares with).

``--input`` takes files (``.jsonl``, ``.json``, ``.parquet``, ``.csv``) or directories (a dataset
snapshot: every data file under it, or only those named after ``--split``). Columns are found
under the names the common copies of each dataset use:

=============  =========================================  ==========================================
dataset        problem column                             answer column
=============  =========================================  ==========================================
math500        problem                                    answer (else the last \\boxed{} of solution)
aime24         problem / Problem / question               answer / Answer
aime25         problem / question / Problem               answer / Answer
amc            problem / question                         answer (floats such as 142.0 -> "142")
minerva        question / problem                         answer (else the last \\boxed{} of solution)
olympiadbench  question / problem                         final_answer (a list; $...$ stripped) / answer
math           problem                                    answer, else the last \\boxed{} of solution
dapo           prompt / problem / source_prompt           solution / answer / reward_model.ground_truth
=============  =========================================  ==========================================

verl-style rows (``prompt`` = chat messages, ``reward_model.ground_truth``) work for every dataset;
their known instruction wrappers (DAPO's, the SFPO reference's) are removed so the template is not
applied twice. Identical (problem, answer) rows are written once (DAPO-Math-17k repeats each
problem), unless ``--keep-duplicates``. A row without a problem or answer stops with the file and
row named, or is skipped and counted with ``--skip-bad``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DataPrepError(ValueError):
    """An input that cannot be turned into prompts; the message names the file, row and columns."""


@dataclass(frozen=True)
class Spec:
    problem: tuple[str, ...]
    answer: tuple[str, ...]
    solution: tuple[str, ...] = ()  # answer taken from the last \boxed{} when no answer column


# verl-style rows (chat-message `prompt`, `reward_model.ground_truth`) are accepted for every dataset.
_VP, _VA = ("prompt",), ("reward_model.ground_truth",)
SPECS: dict[str, Spec] = {
    "math500": Spec(("problem", "question", *_VP), ("answer", *_VA), ("solution",)),
    "aime24": Spec(("problem", "Problem", "question", *_VP), ("answer", "Answer", *_VA), ("solution", "Solution")),
    "aime25": Spec(("problem", "question", "Problem", *_VP), ("answer", "Answer", *_VA), ("solution", "Solution")),
    "amc": Spec(("problem", "question", *_VP), ("answer", *_VA)),
    "minerva": Spec(("question", "problem", *_VP), ("answer", *_VA), ("solution",)),
    "olympiadbench": Spec(("question", "problem", *_VP), ("final_answer", "answer", *_VA), ("solution",)),
    "math": Spec(("problem", "question", *_VP), ("answer", *_VA), ("solution",)),
    "dapo": Spec(("prompt", "problem", "source_prompt"), ("solution", "answer", *_VA)),
}

TEMPLATES = {
    # The SFPO reference code's prompt (its data_preprocess scripts), used for training and test sets.
    "sfpo": ("Please solve the following math problem: {problem}. The assistant first thinks about the "
             "reasoning process step by step and then provides the user with the answer. Return the final "
             "answer in \\boxed{} tags, for example \\boxed{1}. Let's solve this step by step. "),
    # Qwen2.5-Math's chain-of-thought instruction.
    "boxed": "{problem}\nPlease reason step by step, and put your final answer within \\boxed{}.",
    "none": "{problem}",
}

# Instruction wrappers of already-prepared copies: (prefix, suffix) around the bare problem.
_WRAPPERS = (
    ("Solve the following math problem step by step. The last line of your response should be of the "
     "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n",
     "\n\nRemember to put your answer on its own line after \"Answer:\"."),
    ("Please solve the following math problem: ",
     ". The assistant first thinks about the reasoning process step by step and then provides the user "
     "with the answer. Return the final answer in \\boxed{} tags, for example \\boxed{1}. Let's solve "
     "this step by step."),
)

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


# --- reading -----------------------------------------------------------------------------------


def data_files(inputs: Sequence[str], split: str | None) -> list[Path]:
    """The data files named by ``inputs`` (files, or directories searched recursively)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if split is not None:
                found = [p for p in found if re.search(rf"(^|[^a-z]){re.escape(split)}([^a-z]|$)", p.name)]
            if not found:
                raise DataPrepError(f"{path} holds no {'/'.join(DATA_SUFFIXES)} files"
                                    + (f" named after split {split!r}" if split else ""))
            files.extend(found)
        else:
            raise DataPrepError(f"input {path} does not exist")
    return files


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based row number, row) for every row of one file."""
    suffix = path.suffix
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    yield i, _as_row(_json(line, path, i), path, i)
    elif suffix == ".json":
        data = _json(path.read_text(encoding="utf-8"), path, None)
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataPrepError(f"{path}: expected a JSON list of rows, or an object holding one list")
            data = lists[0]
        if not isinstance(data, list):
            raise DataPrepError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
        for i, row in enumerate(data, 1):
            yield i, _as_row(row, path, i)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield i, row
    elif suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            for i, row in enumerate(csv.DictReader(f), 1):
                yield i, dict(row)
    else:
        raise DataPrepError(f"{path}: unsupported file type {suffix!r} (use {', '.join(DATA_SUFFIXES)})")


def _json(text: str, path: Path, line: int | None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"{path}, line {line}" if line else str(path)
        raise DataPrepError(f"{where}: invalid JSON: {e}") from None


def _as_row(row: Any, path: Path, i: int) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataPrepError(f"{path}, row {i}: expected a JSON object, got {type(row).__name__}")
    return row


# --- fields --------------------------------------------------------------------------------------


def _get(row: dict[str, Any], dotted: str) -> Any:
    value: Any = row
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _first(row: dict[str, Any], names: Sequence[str]) -> tuple[str | None, Any]:
    for name in names:
        value = _get(row, name)
        if value is not None and not (isinstance(value, str) and not value.strip()) \
                and not (isinstance(value, list) and not value):
            return name, value
    return None, None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces kept), or ``\\boxed x``."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:]
    brace = rest.find("{")
    name = "\\boxed" if rest.startswith("\\boxed") else "\\fbox"
    if rest.startswith(name + " ") and (brace < 0 or brace > len(name) + 1):
        m = re.match(re.escape(name) + r" +([^\s$]+)", rest)
        return m.group(1) if m else None
    if brace < 0:
        return None
    depth = 0
    for j in range(brace, len(rest)):
        if rest[j] == "{":
            depth += 1
        elif rest[j] == "}":
            depth -= 1
            if depth == 0:
                return rest[brace + 1:j].strip()
    return None


def _strip_math_delimiters(text: str) -> str:
    text = text.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
            return text[len(left):-len(right)].strip()
    return text


def normalise_answer(value: Any) -> str:
    """Ground truth as a string: numbers without a spurious ``.0``, lists joined, ``$..$`` removed."""
    if isinstance(value, bool):
        raise DataPrepError(f"answer {value!r} is a boolean, not a math answer")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DataPrepError(f"answer {value!r} is not a finite number")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (list, tuple)):
        parts = [normalise_answer(v) for v in value]
        return ", ".join(p for p in parts if p)
    if isinstance(value, str):
        return _strip_math_delimiters(value)
    raise DataPrepError(f"answer {value!r} has unsupported type {type(value).__name__}")


def _problem_text(value: Any) -> str:
    """A problem string, or the last user message of a chat-message list, without known wrappers."""
    if isinstance(value, (list, tuple)):
        users = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"]
        if not users or not isinstance(users[-1], str):
            raise DataPrepError("chat-message prompt has no user message with text content")
        value = users[-1]
    if not isinstance(value, str):
        raise DataPrepError(f"problem has unsupported type {type(value).__name__}")
    text = value.strip()
    for prefix, suffix in _WRAPPERS:
        if text.startswith(prefix) and text.endswith(suffix.strip()):
            text = text[len(prefix):len(text) - len(suffix.strip())].strip()
    return text


def render(template: str, problem: str) -> str:
    # str.replace, not str.format: templates contain literal braces (\boxed{}).
    return template.replace("{problem}", problem)


def resolve_template(name_or_format: str) -> str:
    if name_or_format in TEMPLATES:
        return TEMPLATES[name_or_format]
    if "{problem}" in name_or_format:
        return name_or_format
    raise DataPrepError(f"--template must be one of {sorted(TEMPLATES)} or a text containing "
                        f"{{problem}}, got {name_or_format!r}")


# --- conversion ----------------------------------------------------------------------------------


@dataclass
class Report:
    written: int = 0
    duplicates: int = 0
    skipped: int = 0


def convert_row(row: dict[str, Any], spec: Spec, dataset: str, template: str) -> dict[str, Any]:
    pname, raw_problem = _first(row, spec.problem)
    if pname is None:
        raise DataPrepError(f"no problem column (looked for {', '.join(spec.problem)}; "
                            f"row has {', '.join(sorted(row))})")
    problem = _problem_text(raw_problem)
    _, raw_answer = _first(row, spec.answer)
    answer = normalise_answer(raw_answer) if raw_answer is not None else ""
    if not answer and spec.solution:
        sname, solution = _first(row, spec.solution)
        if isinstance(solution, list):
            solution = solution[-1] if solution else None
        answer = (last_boxed(solution) or "") if isinstance(solution, str) else ""
        if not answer and sname is not None:
            raise DataPrepError(f"no answer column and no \\boxed{{}} answer in column {sname!r}")
    if not answer:
        looked = list(spec.answer) + [f"\\boxed{{}} in {c}" for c in spec.solution]
        raise DataPrepError(f"no answer (looked for {', '.join(looked)}; row has {', '.join(sorted(row))})")
    out: dict[str, Any] = {"prompt": render(template, problem), "answer": answer, "problem": problem,
                           "source": dataset}
    _, rid = _first(row, ("id", "ID", "unique_id", "problem_idx", "extra_info.index"))
    if rid is not None:
        out["id"] = rid if isinstance(rid, (int, str)) else str(rid)
    return out


def prepare(dataset: str, inputs: Sequence[str], output: str, template: str = "sfpo",
            split: str | None = None, dedupe: bool = True, skip_bad: bool = False,
            limit: int | None = None) -> Report:
    if dataset not in SPECS:
        raise DataPrepError(f"--dataset must be one of {', '.join(SPECS)}, got {dataset!r}")
    spec, tmpl = SPECS[dataset], resolve_template(template)
    report = Report()
    out_path = Path(output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    try:
        _write(tmp, spec, dataset, tmpl, inputs, split, dedupe, skip_bad, limit, report)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave a half-written file behind
        raise
    if report.written == 0:
        tmp.unlink()
        raise DataPrepError(f"no rows written from {', '.join(inputs)}")
    tmp.replace(out_path)
    return report


def _write(tmp: Path, spec: Spec, dataset: str, tmpl: str, inputs: Sequence[str], split: str | None,
           dedupe: bool, skip_bad: bool, limit: int | None, report: Report) -> None:
    seen: set[tuple[str, str]] = set()
    with tmp.open("w", encoding="utf-8") as f:
        for path in data_files(inputs, split):
            for i, row in read_rows(path):
                if limit is not None and report.written >= limit:
                    break
                try:
                    item = convert_row(row, spec, dataset, tmpl)
                except DataPrepError as e:
                    if not skip_bad:
                        raise DataPrepError(f"{path}, row {i}: {e}") from None
                    report.skipped += 1
                    if report.skipped <= 10:
                        print(f"skipped {path}, row {i}: {e}", file=sys.stderr)
                    continue
                key = (item["problem"], item["answer"])
                if dedupe and key in seen:
                    report.duplicates += 1
                    continue
                seen.add(key)
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
                report.written += 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, choices=sorted(SPECS))
    p.add_argument("--input", required=True, nargs="+", help="data files or dataset directories")
    p.add_argument("--output", required=True, help="JSONL to write")
    p.add_argument("--template", default="sfpo",
                   help=f"{' | '.join(TEMPLATES)} or a text containing {{problem}} (default: sfpo)")
    p.add_argument("--split", default=None, help="in directories, only files named after this split")
    p.add_argument("--keep-duplicates", action="store_true")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) unusable rows")
    p.add_argument("--limit", type=int, default=None, help="write at most N rows")
    a = p.parse_args(argv)
    try:
        r = prepare(a.dataset, a.input, a.output, a.template, a.split, not a.keep_duplicates,
                    a.skip_bad, a.limit)
    except DataPrepError as e:
        print(f"prepare_math_data: error: {e}", file=sys.stderr)
        return 2
    print(f"{a.output}: {r.written} prompts ({r.duplicates} duplicates dropped, {r.skipped} rows skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
