"""tools/prepare_math_data.py on tiny local files shaped like the public copies of each dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from launch import PYTHON, TOOLS, child_env, load_module, read_jsonl, run
from tiny_models import save_chat_tokenizer

from sfpo_megatron.data.prompts import load_prompt_dataset
from sfpo_megatron.data.tokenizer import load_tokenizer

TOOL = TOOLS / "prepare_math_data.py"
pmd = load_module(TOOL)

SFPO_PROMPT = ("Please solve the following math problem: {p}. The assistant first thinks about the reasoning "
               "process step by step and then provides the user with the answer. Return the final answer in "
               "\\boxed{{}} tags, for example \\boxed{{1}}. Let's solve this step by step. ")


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def prepared(tmp_path: Path, dataset: str, *inputs: Path, **kw) -> list[dict]:
    out = tmp_path / f"{dataset}.jsonl"
    pmd.prepare(dataset, [str(i) for i in inputs], str(out), **kw)
    return read_jsonl(out)


def test_math500_snapshot_directory_with_the_sfpo_prompt(tmp_path: Path) -> None:
    # HuggingFaceH4/MATH-500: test.jsonl with problem / solution / answer / unique_id
    snap = tmp_path / "MATH-500"
    jsonl(snap / "test.jsonl", [
        {"problem": "Compute $\\frac{1}{2}+\\frac{1}{3}$.", "solution": "... $\\boxed{\\frac{5}{6}}$",
         "answer": "\\frac{5}{6}", "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"},
        {"problem": "What is $2+2$?", "solution": "\\boxed{4}", "answer": "4", "unique_id": "test/x/2.json"},
    ])
    (snap / ".cache").mkdir()
    (snap / ".cache/junk.json").write_text("not json")  # hidden dirs of a snapshot are ignored
    rows = prepared(tmp_path, "math500", snap)
    assert rows == [
        {"prompt": SFPO_PROMPT.format(p="Compute $\\frac{1}{2}+\\frac{1}{3}$."), "answer": "\\frac{5}{6}",
         "problem": "Compute $\\frac{1}{2}+\\frac{1}{3}$.", "source": "math500", "id": "test/algebra/1.json"},
        {"prompt": SFPO_PROMPT.format(p="What is $2+2$?"), "answer": "4", "problem": "What is $2+2$?",
         "source": "math500", "id": "test/x/2.json"},
    ]


@pytest.mark.parametrize("rows, expected", [
    # HuggingFaceH4/aime_2024, math-ai/aime24
    ([{"id": 60, "problem": "Find x.", "solution": "...", "answer": "204", "url": "u", "year": "2024"}], "204"),
    # Maxwell-Jia/AIME_2024: capitalised columns, integer answers
    ([{"ID": "2024-I-1", "Problem": "Find x.", "Solution": "...", "Answer": 204}], "204"),
])
def test_aime24_column_variants(tmp_path: Path, rows: list[dict], expected: str) -> None:
    (row,) = prepared(tmp_path, "aime24", jsonl(tmp_path / "in.jsonl", rows), template="none")
    assert row["prompt"] == "Find x." and row["answer"] == expected


def test_aime25_parquet_and_opencompass_question_column(tmp_path: Path) -> None:
    # MathArena/aime_2025 (parquet, problem_idx) and opencompass/AIME2025 (question)
    a = parquet(tmp_path / "arena/data/train-00000-of-00001.parquet",
                [{"problem_idx": 1, "problem": "Sum of bases.", "answer": 70}])
    b = jsonl(tmp_path / "oc/aime2025-I.jsonl", [{"question": "Another.", "answer": "588"}])
    rows = prepared(tmp_path, "aime25", tmp_path / "arena", b, template="boxed")
    assert [(r["problem"], r["answer"], r.get("id")) for r in rows] == [("Sum of bases.", "70", 1),
                                                                       ("Another.", "588", None)]
    assert rows[1]["prompt"] == ("Another.\nPlease reason step by step, and put your final answer "
                                 "within \\boxed{}.")


def test_amc_float_answers_become_integers(tmp_path: Path) -> None:
    # AI-MO/aimo-validation-amc stores answers as floats
    src = parquet(tmp_path / "amc.parquet", [{"id": 0, "problem": "P1", "answer": 142.0, "url": "u"},
                                             {"id": 1, "problem": "P2", "answer": 2.5, "url": "u"}])
    assert [r["answer"] for r in prepared(tmp_path, "amc", src)] == ["142", "2.5"]


def test_minerva_answer_or_boxed_solution(tmp_path: Path) -> None:
    # math-ai/minervamath has question/answer; the original release only a solution with \boxed{}
    src = jsonl(tmp_path / "minerva.jsonl", [
        {"question": "Q1", "answer": "3.2e-5"},
        {"problem": "Q2", "solution": "so $\\boxed{\\frac{a}{\\sqrt{b}}}$ and \\fbox{7} is final"},
    ])
    assert [r["answer"] for r in prepared(tmp_path, "minerva", src)] == ["3.2e-5", "7"]


def test_olympiadbench_final_answer_lists(tmp_path: Path) -> None:
    # Hothan/OlympiadBench, math-ai/olympiadbench: final_answer is a list of $...$ strings
    src = parquet(tmp_path / "OE_TO_maths_en_COMP.parquet", [
        {"id": 1606, "question": "Q", "final_answer": ["$\\frac{1}{2}$"], "solution": ["s"],
         "is_multiple_answer": False},
        {"id": 1607, "question": "R", "final_answer": ["$1$", "$-3$"], "solution": ["s"],
         "is_multiple_answer": True},
    ])
    assert [r["answer"] for r in prepared(tmp_path, "olympiadbench", src)] == ["\\frac{1}{2}", "1, -3"]


def test_math_train_answers_come_from_the_last_boxed(tmp_path: Path) -> None:
    # hendrycks MATH / lighteval MATH: problem, solution (no answer column), split files
    snap = tmp_path / "MATH-lighteval"
    parquet(snap / "data/train-00000-of-00001.parquet", [
        {"problem": "P", "level": "Level 1", "type": "Algebra",
         "solution": "First \\boxed{1}, finally $\\boxed{x^{2}+\\{y\\}}$."},
    ])
    parquet(snap / "data/test-00000-of-00001.parquet", [{"problem": "T", "solution": "\\boxed{9}"}])
    rows = prepared(tmp_path, "math", snap, split="train")
    assert [(r["problem"], r["answer"]) for r in rows] == [("P", "x^{2}+\\{y\\}")]


def test_dapo_chat_prompts_are_unwrapped_and_deduplicated(tmp_path: Path) -> None:
    # BytedTsinghua-SIA/DAPO-Math-17k: verl rows, the DAPO instruction around the problem, each
    # problem repeated; open-r1/DAPO-Math-17k-Processed: plain prompt + solution
    wrapped = ("Solve the following math problem step by step. The last line of your response should be of "
               "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
               "Find $n$.\n\nRemember to put your answer on its own line after \"Answer:\".")
    verl_row = {"data_source": "math_dapo", "prompt": [{"content": wrapped, "role": "user"}],
                "ability": "MATH", "reward_model": {"ground_truth": "34", "style": "rule-lighteval/MATH_v2"},
                "extra_info": {"index": "a1"}}
    src = parquet(tmp_path / "dapo.parquet", [verl_row] * 3)
    proc = jsonl(tmp_path / "processed.jsonl", [{"prompt": "Other.", "solution": "12", "data_source": "x"}])
    rows = prepared(tmp_path, "dapo", src, proc)
    assert [(r["problem"], r["answer"], r.get("id")) for r in rows] == [("Find $n$.", "34", "a1"),
                                                                       ("Other.", "12", None)]
    assert len(prepared(tmp_path, "dapo", src, dedupe=False)) == 3


def test_already_templated_verl_rows_are_not_templated_twice(tmp_path: Path) -> None:
    row = {"prompt": [{"role": "user", "content": SFPO_PROMPT.format(p="What is 1+1?")}],
           "reward_model": {"ground_truth": "2"}}
    (out,) = prepared(tmp_path, "math500", jsonl(tmp_path / "verl.jsonl", [row]))
    assert out["problem"] == "What is 1+1?" and out["prompt"] == SFPO_PROMPT.format(p="What is 1+1?")


def test_csv_json_and_custom_template(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("question,answer\n\"2, 3 or 4?\",4\n")
    (tmp_path / "b.json").write_text(json.dumps({"test": [{"problem": "P", "answer": "\\(5\\)"}]}))
    rows = prepared(tmp_path, "amc", tmp_path / "a.csv", tmp_path / "b.json",
                    template="Q: {problem}\nA: \\boxed{}")
    assert [(r["prompt"], r["answer"]) for r in rows] == [("Q: 2, 3 or 4?\nA: \\boxed{}", "4"),
                                                          ("Q: P\nA: \\boxed{}", "5")]


def test_bad_rows_name_file_row_and_columns(tmp_path: Path) -> None:
    src = jsonl(tmp_path / "bad.jsonl", [{"problem": "ok", "answer": "1"}, {"question": "no answer here"},
                                         {"text": "no problem"}])
    with pytest.raises(pmd.DataPrepError, match=r"bad.jsonl, row 2: no answer \(looked for answer, "
                                                r"reward_model.ground_truth; row has question\)"):
        prepared(tmp_path, "amc", src)
    assert not list(tmp_path.glob("amc.jsonl*"))  # nothing half-written
    with pytest.raises(pmd.DataPrepError, match=r"row 3: no problem column \(looked for problem, question, prompt; "
                                                r"row has text\)"):
        prepared(tmp_path, "amc", jsonl(tmp_path / "bad2.jsonl", [{"problem": "ok", "answer": 1},
                                                                 {"problem": "x", "answer": 2},
                                                                 {"text": "no problem"}]))
    rows = prepared(tmp_path, "math500", jsonl(tmp_path / "b3.jsonl", [{"problem": "p", "solution": "none"}]
                                               + [{"problem": "q", "answer": "1"}]), skip_bad=True)
    assert [r["problem"] for r in rows] == ["q"]
    (tmp_path / "j.jsonl").write_text("{oops\n")
    with pytest.raises(pmd.DataPrepError, match=r"j.jsonl, line 1: invalid JSON"):
        prepared(tmp_path, "amc", tmp_path / "j.jsonl")
    with pytest.raises(pmd.DataPrepError, match=r"--template must be one of"):
        prepared(tmp_path, "amc", src, template="fancy")
    with pytest.raises(pmd.DataPrepError, match=r"input .*missing does not exist"):
        prepared(tmp_path, "amc", tmp_path / "missing")


def test_cli_writes_the_file_the_trainer_reads(tmp_path: Path) -> None:
    src = jsonl(tmp_path / "in.jsonl", [{"problem": "What is 3+4?", "answer": "7"}])
    out = tmp_path / "data/out.jsonl"
    proc = run([PYTHON, str(TOOL), "--dataset", "math500", "--input", str(src),
                "--output", str(out)], env=child_env(), timeout=60)
    assert "1 prompts (0 duplicates dropped, 0 rows skipped)" in proc.stdout
    bad = run([PYTHON, str(TOOL), "--dataset", "amc", "--input",
               str(tmp_path / "nope"), "--output", str(out)], env=child_env(), timeout=60, check=False)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    # The project's own loader accepts the output (prompt / answer keys, extra keys as metadata).
    tok_dir = tmp_path / "tok"
    save_chat_tokenizer(tok_dir)
    ds = load_prompt_dataset(str(out), load_tokenizer(str(tok_dir)))
    assert len(ds) == 1 and ds[0].answer == "7" and "What is 3+4?" in ds[0].prompt_text
