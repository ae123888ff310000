"""Prompt datasets (JSONL / Parquet / reasoning-gym), malformed rows, eval specs and the sampler."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sfpo_megatron.data.prompts import (
    DatasetError,
    MalformedRowError,
    PromptSampler,
    load_eval_datasets,
    load_prompt_dataset,
    parse_eval_specs,
    parse_rg_spec,
    reasoning_gym_dataset,
)
from sfpo_megatron.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

CORPUS = [
    "System: Be exact.\nUser: What is 1/2 + 1/4? Put the answer in \\boxed{}.\nAssistant: \\boxed{3/4}",
    "User: Calculate ( 56 + -33 ) - 84. Solve x = 2y, with {a, b}: [q].\nAssistant: <answer>-61</answer>",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 ,.;:!?'\"()*/+-=_#%&<>",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> SentencePieceTokenizer:
    model = train_sentencepiece(CORPUS * 20, 120, tmp_path_factory.mktemp("sp") / "m")
    return SentencePieceTokenizer(model)


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_fields_template_and_metadata(tmp_path: Path, tok: SentencePieceTokenizer) -> None:
    path = write_jsonl(
        tmp_path / "math.jsonl",
        [
            json.dumps({"question": "What is 1/2 + 1/4?", "solution": "3/4", "level": 2}),
            "",  # blank lines are ignored
            json.dumps(
                {
                    "question": [
                        {"role": "system", "content": "Own system."},
                        {"role": "user", "content": "Calculate 2 + 2."},
                    ],
                    "solution": 4,
                }
            ),
        ],
    )
    ds = load_prompt_dataset(
        path,
        tok,
        prompt_key="question",
        answer_key="solution",
        system_prompt="Be exact.",
        prompt_template="{prompt} Put the answer in \\boxed{}.",
    )
    assert len(ds) == 2 and ds.name == "math" and ds.num_skipped == 0
    first = ds[0]
    assert first.index == 0
    assert first.prompt_text == (
        "System: Be exact.\nUser: What is 1/2 + 1/4? Put the answer in \\boxed{}.\nAssistant:"
    )
    assert first.prompt_ids == tok.encode(first.prompt_text)
    assert first.answer == "3/4"
    assert first.metadata == {"level": 2, "task": "math.jsonl"}
    second = ds[1]
    # the row's own system turn is kept (not doubled); numeric answers become strings
    assert second.prompt_text == "System: Own system.\nUser: Calculate 2 + 2. Put the answer in \\boxed{}.\nAssistant:"
    assert second.answer == "4"
    raw = load_prompt_dataset(path, tok, prompt_key="question", answer_key="solution", apply_chat_template=False)
    assert raw[0].prompt_text == "What is 1/2 + 1/4?"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"prompt": "x", "answer": ', "invalid JSON: Expecting value at column 27"),
        ('{"prompt": "x"}', "missing field 'answer' (fields: ['prompt'])"),
        ('{"prompt": 7, "answer": "1"}', "field 'prompt' must be a string or a non-empty list of chat messages, got int: 7"),
        ('{"prompt": "x", "answer": null}', "field 'answer' must be a string or a number, got NoneType: None"),
        ('{"prompt": "x", "answer": true}', "field 'answer' must be a string or a number, got bool: True"),
        ('["x", "1"]', "expected an object with fields, got list"),
        (
            '{"prompt": [{"role": "user"}], "answer": "1"}',
            "field 'prompt' message 0 must have string 'role' and 'content', got {'role': 'user'}",
        ),
    ],
)
def test_malformed_jsonl_row_names_file_and_line(
    tmp_path: Path, tok: SentencePieceTokenizer, line: str, problem: str
) -> None:
    good = json.dumps({"prompt": "What is 1 + 1?", "answer": "2"})
    path = write_jsonl(tmp_path / "bad.jsonl", [good, "", line, good])
    with pytest.raises(MalformedRowError) as info:
        load_prompt_dataset(path, tok)
    assert str(info.value) == f"{path}, line 3: {problem}"
    assert (info.value.path, info.value.line, info.value.problem) == (str(path), 3, problem)
    assert isinstance(info.value, ValueError)

    ds = load_prompt_dataset(path, tok, skip_malformed=True)
    assert len(ds) == 2 and ds.num_skipped == 1
    assert [item.answer for item in ds] == ["2", "2"]


def test_jsonl_all_rows_bad_or_wrong_file(tmp_path: Path, tok: SentencePieceTokenizer) -> None:
    path = write_jsonl(tmp_path / "allbad.jsonl", ["{", "{"])
    with pytest.raises(DatasetError, match=r"dataset 'allbad' has no usable rows \(2 skipped\)"):
        load_prompt_dataset(path, tok, skip_malformed=True)
    with pytest.raises(DatasetError, match="unknown prompt data 'data.csv'"):
        load_prompt_dataset("data.csv", tok)
    with pytest.raises(DatasetError, match="cannot read prompt file"):
        load_prompt_dataset(tmp_path / "missing.jsonl", tok)
    (tmp_path / "bin.jsonl").write_bytes(b'{"prompt": "x", "answer": "1"}\n"\xff\xfe"\n')
    with pytest.raises(MalformedRowError, match=r"bin.jsonl, line 2: not UTF-8 text: 'utf-8' codec"):
        load_prompt_dataset(tmp_path / "bin.jsonl", tok)
    assert load_prompt_dataset(tmp_path / "bin.jsonl", tok, skip_malformed=True).num_skipped == 1


def test_malformed_parquet_rows_name_file_and_row(tmp_path: Path, tok: SentencePieceTokenizer) -> None:
    path = tmp_path / "data.parquet"
    table = pa.table(
        {
            "problem": ["What is 1 + 1?", "What is 2 + 2?", None, "What is 4 + 4?"],
            "answer": ["2", None, "6", "8"],
            "source": ["a", "b", "c", "d"],
        }
    )
    pq.write_table(table, path, row_group_size=2)  # rows span row groups
    with pytest.raises(MalformedRowError) as info:
        load_prompt_dataset(path, tok, prompt_key="problem")
    assert str(info.value) == f"{path}, row 2: field 'answer' must be a string or a number, got NoneType: None"
    assert info.value.line == 2

    ds = load_prompt_dataset(path, tok, prompt_key="problem", skip_malformed=True)
    assert ds.num_skipped == 2
    assert [(item.answer, item.metadata["source"]) for item in ds] == [("2", "a"), ("8", "d")]
    assert ds[1].prompt_text == "User: What is 4 + 4?\nAssistant:"

    # a wrongly typed column
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"prompt": ["x"], "answer": [[1, 2]]}), wrong)
    with pytest.raises(MalformedRowError, match=r"wrong.parquet, row 1: field 'answer' must be a string or a number, got list: \[1, 2\]"):
        load_prompt_dataset(wrong, tok)
    # a missing column is reported on its first row
    with pytest.raises(MalformedRowError, match=r"data.parquet, row 1: missing field 'prompt'"):
        load_prompt_dataset(path, tok)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match="cannot read Parquet file"):
        load_prompt_dataset(tmp_path / "junk.parquet", tok)


def test_reasoning_gym_dataset(tok: SentencePieceTokenizer) -> None:
    import reasoning_gym

    ds = load_prompt_dataset("rg:basic_arithmetic?size=20&seed=3&max_terms=3", tok, system_prompt="Be exact.")
    reference = reasoning_gym.create_dataset("basic_arithmetic", size=20, seed=3, max_terms=3)
    assert len(ds) == 20 and ds.name == "basic_arithmetic"
    for i in (0, 7, 19):
        item, entry = ds[i], reference[i]
        assert item.answer == entry["answer"]
        assert item.prompt_text == f"System: Be exact.\nUser: {entry['question']}\nAssistant:"
        assert item.metadata["task"] == "rg:basic_arithmetic"
        assert item.metadata["rg_entry"] == entry
        assert item.metadata["rg_config"] == {"size": 20, "seed": 3, "max_terms": 3}
    again = reasoning_gym_dataset("basic_arithmetic", tok, size=20, seed=3, max_terms=3)
    assert [again[i].prompt_ids for i in range(20)] == [
        tok.apply_chat_template([{"role": "user", "content": reference[i]["question"]}]) for i in range(20)
    ]
    assert [again[i].answer for i in range(20)] == [ds[i].answer for i in range(20)]


def test_rg_and_eval_specs(tmp_path: Path, tok: SentencePieceTokenizer) -> None:
    assert parse_rg_spec("rg:chain_sum?size=5&seed=2&min_terms=2&name=x") == (
        "chain_sum",
        {"size": 5, "seed": 2, "min_terms": 2, "name": "x"},
    )
    with pytest.raises(DatasetError, match=r"needs an integer seed= parameter"):
        parse_rg_spec("rg:chain_sum?size=5")
    with pytest.raises(DatasetError, match=r"size must be positive, got 0"):
        parse_rg_spec("rg:chain_sum?size=0&seed=1")
    with pytest.raises(DatasetError, match="cannot create reasoning-gym dataset 'no_such_task'"):
        load_prompt_dataset("rg:no_such_task?size=5&seed=1", tok)

    path = write_jsonl(tmp_path / "held.jsonl", [json.dumps({"prompt": "What is 1 + 1?", "answer": "2"})])
    specs = [f"held={path}", "rg:basic_arithmetic?size=4&seed=9", f"other={path}"]
    assert parse_eval_specs(specs) == {
        "held": str(path),
        "basic_arithmetic": "rg:basic_arithmetic?size=4&seed=9",
        "other": str(path),
    }
    evals = load_eval_datasets(specs, tok)
    assert {k: len(v) for k, v in evals.items()} == {"held": 1, "basic_arithmetic": 4, "other": 1}
    assert evals["held"].name == "held"
    with pytest.raises(DatasetError, match="eval dataset name 'held' is given twice"):
        parse_eval_specs([f"held={path}", f"held={path}"])


def test_sampler_epochs_and_exact_resume(tok: SentencePieceTokenizer) -> None:
    ds = load_prompt_dataset("rg:basic_arithmetic?size=10&seed=1", tok)
    sampler = PromptSampler(ds, batch_size=4, seed=5)
    stream = [[item.index for item in sampler.next_batch()] for _ in range(10)]  # 40 items = 4 epochs
    flat = [i for batch in stream for i in batch]
    epochs = [flat[e * 10 : (e + 1) * 10] for e in range(4)]
    assert all(sorted(e) == list(range(10)) for e in epochs)  # each epoch visits every item once
    assert len({tuple(e) for e in epochs}) == 4  # reshuffled every epoch
    assert stream[2] == epochs[0][8:] + epochs[1][:2]  # batches run across epoch boundaries
    assert sampler.state_dict()["epoch"] == 4 and sampler.state_dict()["position"] == 0

    # resume mid-epoch from a JSON round-tripped state: the next batches are identical
    a = PromptSampler(ds, batch_size=4, seed=5)
    for _ in range(3):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    assert (state["epoch"], state["position"]) == (1, 2)
    b = PromptSampler(ds, batch_size=4, seed=5)
    b.load_state_dict(state)
    assert [[i.index for i in b.next_batch()] for _ in range(7)] == stream[3:]
    assert b.next_indices(3) == PromptSampler(ds, 4, seed=5).next_indices(43)[40:]  # smaller refill batches

    unshuffled = PromptSampler(ds, batch_size=4, seed=5, shuffle=False)
    assert [i.index for i in unshuffled.next_batch(12)] == list(range(10)) + [0, 1]
    other_seed = PromptSampler(ds, batch_size=4, seed=6)
    assert other_seed.next_indices(10) != epochs[0]
    with pytest.raises(ValueError, match="sampler state has seed=5 but this sampler has seed=6"):
        other_seed.load_state_dict(state)
    with pytest.raises(ValueError, match=r"sampler state \(epoch=0, position=10\) is out of range"):
        PromptSampler(ds, 4, seed=5).load_state_dict({"epoch": 0, "position": 10})
