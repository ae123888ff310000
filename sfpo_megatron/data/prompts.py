"""Prompt datasets (JSONL, Parquet, reasoning-gym) and the deterministic, resumable sampler.

Dataset specs (`load_prompt_dataset`):
  * `path/to/file.jsonl` (or `.json` holding JSON lines): one JSON object per line.
  * `path/to/file.parquet`: one row per prompt.
  * `rg:NAME?size=1000&seed=1&<config key>=<value>...`: a reasoning-gym task generated locally.

File rows need a prompt field (a string, or a list of `{"role", "content"}` chat messages) and an
answer field (a string or a number); the field names are configurable. Every other field of the
row goes into the item's metadata for user reward functions. A malformed row raises
`MalformedRowError` naming the file, the 1-based line (JSONL) or row (Parquet) and the problem, or
with `skip_malformed=True` is skipped and counted in `PromptDataset.num_skipped`.

Items carry the rendered prompt text and its token ids (chat template applied unless disabled).
Reasoning-gym items keep the generating entry and dataset config in their metadata so the task's
own scorer can be rebuilt anywhere (see `rewards.reasoning_gym_reward`).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import reasoning_gym

from sfpo_megatron.data.tokenizer import Message, Tokenizer
from sfpo_megatron.errors import UserError

logger = logging.getLogger(__name__)

RG_PREFIX = "rg:"
_LOGGED_SKIPS = 10  # skipped rows logged one by one before only the total is reported


class DatasetError(UserError):
    """A dataset spec or file cannot be used."""


class MalformedRowError(DatasetError):
    """One row of a prompt file is unusable. `line` is 1-based (JSONL line / Parquet row)."""

    def __init__(self, path: str, line: int, problem: str, unit: str = "line") -> None:
        self.path, self.line, self.problem = path, line, problem
        super().__init__(f"{path}, {unit} {line}: {problem}")


@dataclass(frozen=True)
class PromptItem:
    """One prompt: `index` is its position in the dataset; `metadata["task"]` names its source."""

    index: int
    prompt_ids: list[int]
    prompt_text: str
    answer: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Row:
    messages: list[Message]
    answer: str
    metadata: dict[str, Any]


class PromptDataset(Sequence[PromptItem]):
    """Validated rows; prompts are rendered and tokenized on access (cheap, deterministic)."""

    def __init__(
        self,
        name: str,
        rows: list[_Row],
        tokenizer: Tokenizer,
        system_prompt: str | None = None,
        prompt_template: str | None = None,
        apply_chat_template: bool = True,
        num_skipped: int = 0,
    ) -> None:
        if not rows:
            raise DatasetError(f"dataset {name!r} has no usable rows ({num_skipped} skipped)")
        if prompt_template is not None and "{prompt}" not in prompt_template:
            raise DatasetError(f"prompt template {prompt_template!r} lacks the {{prompt}} placeholder")
        self.name = name
        self.rows = rows
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.prompt_template = prompt_template
        self.apply_chat_template = apply_chat_template
        self.num_skipped = num_skipped

    def __len__(self) -> int:
        return len(self.rows)

    def messages(self, index: int) -> list[Message]:
        """The conversation for row `index` after the template and system prompt are applied."""
        messages = [dict(m) for m in self.rows[index].messages]
        if self.prompt_template is not None:
            # The template wraps the last user turn; replace() keeps LaTeX braces intact.
            for m in reversed(messages):
                if m["role"] == "user":
                    m["content"] = self.prompt_template.replace("{prompt}", m["content"])
                    break
        if self.system_prompt is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def __getitem__(self, index: int) -> PromptItem:  # type: ignore[override]
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"PromptDataset indices are integers, got {type(index).__name__}")
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for dataset {self.name!r} of {len(self)}")
        index %= len(self)
        row = self.rows[index]
        messages = self.messages(index)
        if self.apply_chat_template:
            text = self.tokenizer.render_chat(messages, add_generation_prompt=True)
        else:
            # Raw mode (base models): the user turns' text, system prompt first.
            text = "\n".join(m["content"] for m in messages)
        return PromptItem(
            index=index,
            prompt_ids=self.tokenizer.encode(text),
            prompt_text=text,
            answer=row.answer,
            metadata=dict(row.metadata),  # a copy: consumers may annotate it
        )


# --------------------------------------------------------------------------- row validation


def _row_to_prompt(
    record: Any, prompt_key: str, answer_key: str, task: str
) -> _Row:
    """Validate one decoded record; raises ValueError with the problem (no location)."""
    if not isinstance(record, dict):
        raise ValueError(f"expected an object with fields, got {type(record).__name__}")
    for key in (prompt_key, answer_key):
        if key not in record:
            raise ValueError(f"missing field {key!r} (fields: {sorted(record)})")
    prompt, answer = record[prompt_key], record[answer_key]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"field {prompt_key!r} is empty")
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt:
        messages = []
        for i, m in enumerate(prompt):
            if not (
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
            ):
                raise ValueError(
                    f"field {prompt_key!r} message {i} must have string 'role' and 'content', got {m!r}"
                )
            messages.append({"role": m["role"], "content": m["content"]})
    else:
        raise ValueError(
            f"field {prompt_key!r} must be a string or a non-empty list of chat messages, "
            f"got {type(prompt).__name__}: {prompt!r}"
        )
    # bool is an int subclass but never a sensible answer.
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(
            f"field {answer_key!r} must be a string or a number, got {type(answer).__name__}: {answer!r}"
        )
    metadata = {k: v for k, v in record.items() if k not in (prompt_key, answer_key)}
    metadata["task"] = task
    return _Row(messages, str(answer), metadata)


class _RowCollector:
    """Keeps valid rows; raises on a bad one, or skips, counts and logs it."""

    def __init__(self, path: str, unit: str, skip_malformed: bool) -> None:
        self.path, self.unit, self.skip = path, unit, skip_malformed
        self.rows: list[_Row] = []
        self.skipped = 0

    def bad(self, line: int, problem: str) -> None:
        err = MalformedRowError(self.path, line, problem, self.unit)
        if not self.skip:
            raise err
        self.skipped += 1
        if self.skipped <= _LOGGED_SKIPS:
            logger.warning("skipping malformed row: %s", err)

    def add(self, line: int, record: Any, prompt_key: str, answer_key: str, task: str) -> None:
        try:
            self.rows.append(_row_to_prompt(record, prompt_key, answer_key, task))
        except ValueError as exc:
            self.bad(line, str(exc))

    def finish(self) -> None:
        if self.skipped > _LOGGED_SKIPS:
            logger.warning("%s: %d malformed rows skipped in total", self.path, self.skipped)


def read_jsonl_rows(
    path: str | os.PathLike, prompt_key: str, answer_key: str, skip_malformed: bool
) -> tuple[list[_Row], int]:
    """(valid rows, number skipped) of a JSON-lines file. Blank lines are ignored."""
    path = str(path)
    collector = _RowCollector(path, "line", skip_malformed)
    try:
        f = open(path, "rb")  # bytes, so a bad encoding is pinned to its own line
    except OSError as exc:
        raise DatasetError(f"cannot read prompt file {path!r}: {exc}") from exc
    with f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                collector.bad(line_no, f"not UTF-8 text: {exc}")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                collector.bad(line_no, f"invalid JSON: {exc.msg} at column {exc.colno}")
                continue
            collector.add(line_no, record, prompt_key, answer_key, Path(path).name)
    collector.finish()
    return collector.rows, collector.skipped


def read_parquet_rows(
    path: str | os.PathLike, prompt_key: str, answer_key: str, skip_malformed: bool
) -> tuple[list[_Row], int]:
    """(valid rows, number skipped) of a Parquet file; row numbers in errors are 1-based."""
    path = str(path)
    collector = _RowCollector(path, "row", skip_malformed)
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(f"cannot read Parquet file {path!r}: {exc}") from exc
    row_no = 0
    for batch in pf.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            row_no += 1
            collector.add(row_no, record, prompt_key, answer_key, Path(path).name)
    collector.finish()
    return collector.rows, collector.skipped


# --------------------------------------------------------------------------- reasoning-gym


def parse_rg_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """`rg:NAME?size=1000&seed=1&k=v` -> (NAME, {"size": 1000, "seed": 1, "k": v}).

    Values are Python literals when they parse as one (ints, floats, True/False, tuples), else
    strings. size and seed are required so that a run is reproducible from its spec.
    """
    if not spec.startswith(RG_PREFIX):
        raise DatasetError(f"reasoning-gym spec {spec!r} must start with {RG_PREFIX!r}")
    name, _, query = spec[len(RG_PREFIX):].partition("?")
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise DatasetError(f"reasoning-gym spec {spec!r} has no valid dataset name")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise DatasetError(f"reasoning-gym spec {spec!r} has a bad query: {exc}") from exc
    config: dict[str, Any] = {}
    for key, raw in pairs:
        try:
            config[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            config[key] = raw
    for key in ("size", "seed"):
        if not isinstance(config.get(key), int) or isinstance(config.get(key), bool):
            raise DatasetError(f"reasoning-gym spec {spec!r} needs an integer {key}= parameter")
    if config["size"] <= 0:
        raise DatasetError(f"reasoning-gym spec {spec!r}: size must be positive, got {config['size']}")
    return name, config


def reasoning_gym_rows(name: str, config: dict[str, Any]) -> list[_Row]:
    """Generate a reasoning-gym task locally; each row keeps its rg entry for scoring."""
    try:
        dataset = reasoning_gym.create_dataset(name, **config)
    except (ValueError, TypeError, AssertionError, KeyError) as exc:
        raise DatasetError(f"cannot create reasoning-gym dataset {name!r} with {config}: {exc}") from exc
    task = f"{RG_PREFIX}{name}"
    rows = []
    for entry in dataset:
        metadata = {"task": task, "rg_dataset": name, "rg_config": dict(config), "rg_entry": entry}
        answer = entry.get("answer")
        rows.append(
            _Row(
                [{"role": "user", "content": entry["question"]}],
                "" if answer is None else str(answer),
                metadata,
            )
        )
    return rows


# --------------------------------------------------------------------------- public loaders


def load_prompt_dataset(
    spec: str | os.PathLike,
    tokenizer: Tokenizer,
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    system_prompt: str | None = None,
    prompt_template: str | None = None,
    apply_chat_template: bool = True,
    skip_malformed: bool = False,
    name: str | None = None,
) -> PromptDataset:
    """Load a JSONL / Parquet file or a `rg:` reasoning-gym spec (see the module docstring).

    `prompt_template` wraps the user prompt, e.g. "{prompt}\\nPut the final answer in \\boxed{}.";
    `system_prompt` adds a system turn unless the row brings its own.
    """
    spec = str(spec)
    skipped = 0
    if spec.startswith(RG_PREFIX):
        rg_name, config = parse_rg_spec(spec)
        rows = reasoning_gym_rows(rg_name, config)
        default_name = rg_name
    else:
        suffix = Path(spec).suffix.lower()
        if suffix in (".jsonl", ".json"):
            rows, skipped = read_jsonl_rows(spec, prompt_key, answer_key, skip_malformed)
        elif suffix == ".parquet":
            rows, skipped = read_parquet_rows(spec, prompt_key, answer_key, skip_malformed)
        else:
            raise DatasetError(
                f"unknown prompt data {spec!r}: expected a .jsonl, .json or .parquet file or an "
                f"{RG_PREFIX}NAME?size=N&seed=S spec"
            )
        default_name = Path(spec).stem
    return PromptDataset(
        name or default_name,
        rows,
        tokenizer,
        system_prompt=system_prompt,
        prompt_template=prompt_template,
        apply_chat_template=apply_chat_template,
        num_skipped=skipped,
    )


def reasoning_gym_dataset(
    task: str,
    tokenizer: Tokenizer,
    size: int,
    seed: int,
    system_prompt: str | None = None,
    prompt_template: str | None = None,
    apply_chat_template: bool = True,
    **config: Any,
) -> PromptDataset:

    """A reasoning-gym task as a PromptDataset; `config` goes to the task's config class."""
    spec = f"{RG_PREFIX}{task}?size={int(size)}&seed={int(seed)}"
    name, parsed = parse_rg_spec(spec)
    return PromptDataset(
        name,
        reasoning_gym_rows(name, {**parsed, **config}),
        tokenizer,
        system_prompt=system_prompt,
        prompt_template=prompt_template,
        apply_chat_template=apply_chat_template,
    )


_EVAL_NAME = re.compile(r"([A-Za-z0-9_.\-]+)=(.+)")


def parse_eval_specs(specs: Sequence[str]) -> dict[str, str]:
    """`["gsm=data/gsm.jsonl", "arith=rg:basic_arithmetic?size=200&seed=9", "x.parquet"]` ->
    {name: spec}. A spec without `name=` is named after its file stem or rg task name."""
    out: dict[str, str] = {}
    for spec in specs:
        match = _EVAL_NAME.fullmatch(spec)
        if match and not spec.startswith(RG_PREFIX):
            name, target = match.group(1), match.group(2)
        elif spec.startswith(RG_PREFIX):
            name, target = parse_rg_spec(spec)[0], spec
        else:
            name, target = Path(spec).stem, spec
        if name in out:
            raise DatasetError(f"eval dataset name {name!r} is given twice ({out[name]!r} and {target!r})")
        out[name] = target
    return out


def load_eval_datasets(specs: Sequence[str], tokenizer: Tokenizer, **kwargs: Any) -> dict[str, PromptDataset]:
    """`--eval-prompt-data name=path ...` -> {name: PromptDataset}; kwargs as `load_prompt_dataset`."""
    return {
        name: load_prompt_dataset(target, tokenizer, name=name, **kwargs)
        for name, target in parse_eval_specs(specs).items()
    }


# --------------------------------------------------------------------------- sampler


class PromptSampler:
    """Deterministic, resumable stream of prompt batches over epochs.

    Epoch e visits every item once in the order `default_rng(seed + e).permutation(n)` (or in
    file order without shuffle). Batches run across epoch boundaries, so every batch is full. The
    state is (epoch, position within the epoch); `load_state_dict` on a sampler built over the
    same dataset and seed makes it yield exactly the batches the saved one would have yielded.
    """

    def __init__(self, dataset: Sequence[PromptItem], batch_size: int, seed: int, shuffle: bool = True) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(dataset) == 0:
            raise ValueError("PromptSampler needs a non-empty dataset")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order = np.arange(0)

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            n = len(self.dataset)
            self._order = (
                np.random.default_rng(self.seed + self.epoch).permutation(n) if self.shuffle else np.arange(n)
            )
            self._order_epoch = self.epoch
        return self._order

    def next_indices(self, size: int | None = None) -> list[int]:
        """Dataset indices of the next `size` (default batch_size) prompts; advances the state."""
        size = self.batch_size if size is None else size
        if size <= 0:
            raise ValueError(f"batch size must be positive, got {size}")
        out: list[int] = []
        while len(out) < size:
            order = self._epoch_order()
            take = min(size - len(out), len(order) - self.position)
            out.extend(int(i) for i in order[self.position : self.position + take])
            self.position += take
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def next_batch(self, size: int | None = None) -> list[PromptItem]:
        """The next `size` (default batch_size) prompt items."""
        return [self.dataset[i] for i in self.next_indices(size)]

    def __iter__(self) -> Iterator[list[PromptItem]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int | bool]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "dataset_size": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A different dataset or seed would silently change the stream: refuse it.
        for key, mine in (("seed", self.seed), ("shuffle", self.shuffle), ("dataset_size", len(self.dataset))):
            if key in state and state[key] != mine:
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has {key}={mine!r}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self.dataset):
            raise ValueError(
                f"sampler state (epoch={epoch}, position={position}) is out of range for "
                f"a dataset of {len(self.dataset)}"
            )
        self.epoch, self.position = epoch, position


def dataset_kwargs(args: Any) -> dict[str, Any]:
    """The prompt-formatting flags of ``rl`` / ``eval`` as keyword arguments of the loaders."""
    return dict(prompt_key=args.prompt_key, answer_key=args.answer_key, system_prompt=args.system_prompt,
                prompt_template=args.prompt_template, apply_chat_template=args.apply_chat_template,
                skip_malformed=args.skip_malformed)
