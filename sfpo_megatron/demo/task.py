"""The demo's task: a small reasoning-gym arithmetic task, its SentencePiece tokenizer, SFT corpus
and the prompt / validation specs the RL loop reads.

A prompt is the user question rendered with the SentencePiece chat format (`ChatFormat`), e.g.

    User: Calculate 34 + 57.
    Assistant:

and the target response is " 91" followed by EOS. The SFT text of an example is exactly the
rendered prompt followed by the response, so a warm-started model answers in the format the RL
reward reads (the whole response, stripped, compared with the reference).

Train prompts, validation prompts and the SFT corpus come from different reasoning-gym seeds
(see `TASKS` for how much their questions overlap).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import reasoning_gym

from sfpo_megatron.data.rewards import reasoning_gym_reward
from sfpo_megatron.data.tokenizer import ChatFormat, train_sentencepiece
from sfpo_megatron.errors import UserError

# Seeds of the three disjoint streams of task items (reasoning-gym seeds items by seed + index).
TRAIN_SEED = 1_000
VALID_SEED = 2_000_000
SFT_SEED = 5_000_000


class DemoTaskError(UserError):
    """An unknown task preset or unusable task settings."""


@dataclass(frozen=True)
class DemoTask:
    """A reasoning-gym dataset name with the config that makes it learnable by a tiny model."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    # Mean SFT loss (all tokens) at which the warm start stops, measured per task with the demo's
    # model. basic_arithmetic: the loss falls from a ~0.59 plateau to ~0.42; at 0.50 sampled
    # accuracy (T=1, top-p 0.7) is about 50-60 %.
    sft_target_loss: float = 0.50
    # Fraction of the question space held out: a question (by its text) is held out when its
    # SHA-256 falls in that fraction. Held-out questions are the only validation questions and
    # never appear in the SFT corpus or the RL training prompts (see `heldout_split`).
    heldout_fraction: float = 0.0

    def is_heldout(self, question: str) -> bool:
        digest = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big")
        return digest / 2**64 < self.heldout_fraction

    def spec(self, size: int, seed: int) -> str:
        """The `rg:` spec of `size` items from `seed` (the loop's --prompt-data format).

        Values are written as Python literals and percent-encoded: `+` in an operator list
        would otherwise be read back as a space.
        """
        query = [f"size={int(size)}", f"seed={int(seed)}"]
        query += [f"{key}={quote(repr(value), safe='')}" for key, value in self.config.items()]
        return f"rg:{self.name}?" + "&".join(query)

    def entries(self, size: int, seed: int) -> list[dict[str, Any]]:
        """The reasoning-gym entries of `spec(size, seed)`."""
        if size <= 0:
            raise DemoTaskError(f"size must be positive, got {size}")
        return list(reasoning_gym.create_dataset(self.name, size=size, seed=seed, **self.config))


# Presets a ~100k-parameter model partly learns in about a minute of CPU pretraining: two
# one-digit terms, + and - only. Larger numbers are out of reach at this budget (measured: a
# 0.8M-parameter model after 300 iterations answers 2-digit sums correctly < 1 % of the time).
# The question space is small (basic_arithmetic: 11 x 11 x 2 = 242 questions), so train,
# validation and SFT streams share questions: validation accuracy is accuracy on the task's
# distribution, not on held-out questions.
TASKS: dict[str, DemoTask] = {
    "basic_arithmetic": DemoTask(
        "basic_arithmetic",
        {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1,
         "operators": ("+", "-"), "allow_parentheses": False, "allow_negation": False},
        "a + b or a - b with a, b in 0..10",
    ),
    # Its long fixed prompt (~50 tokens with a 64-piece vocabulary) dilutes the per-token loss:
    # plateau ~0.17; measured 0.141 -> 44 % and 0.133 -> 57 % sampled accuracy (T=1, top-p 0.7).
    "chain_sum": DemoTask(
        "chain_sum",
        {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
        "a + b or a - b with a, b in 0..9",
        sft_target_loss=0.138,
    ),
    # chain_sum with a quarter of its 200 questions held out: validation asks only questions that
    # neither the SFT corpus nor the RL prompts contain.
    "chain_sum_heldout": DemoTask(
        "chain_sum",
        {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
        "chain_sum, validation on held-out questions only",
        sft_target_loss=0.138,
        heldout_fraction=0.25,
    ),
}


# The tool-use demo (`--task tool-arithmetic`): sums and differences of 3-digit terms, which the
# demo's model cannot compute, but can hand to the calculator tool and copy its answer from.
TOOL_TASK = "tool-arithmetic"
TOOL_ARITHMETIC = DemoTask(
    "basic_arithmetic",
    {"min_terms": 2, "max_terms": 2, "min_digits": 3, "max_digits": 3,
     "operators": ("+", "-"), "allow_parentheses": False, "allow_negation": False},
    "a + b or a - b with terms of up to 3 digits, through the calculator tool",
)
TOOL_CALL = ("<code>", "</code>")  # --tool-call-format code
TOOL_OUTPUT = ("<output>", "</output>")
TOOL_TEMPLATE = TOOL_OUTPUT[0] + "{output}" + TOOL_OUTPUT[1]  # --tool-response-template


def get_task(name: str) -> DemoTask:
    if name == TOOL_TASK:
        return TOOL_ARITHMETIC
    if name not in TASKS:
        raise DemoTaskError(f"unknown demo task {name!r}; known: {', '.join(sorted(TASKS) + [TOOL_TASK])}")
    return TASKS[name]


def render_prompt(question: str, chat_format: ChatFormat | None = None) -> str:
    """The prompt text the RL loop builds for a reasoning-gym question (chat format applied)."""
    return (chat_format or ChatFormat()).render([{"role": "user", "content": question}])


def sft_text(question: str, answer: str, chat_format: ChatFormat | None = None) -> str:
    """Prompt followed by the target response (EOS is appended by the preprocessor)."""
    return render_prompt(question, chat_format) + " " + str(answer)


def sft_corpus(task: DemoTask, size: int, seed: int = SFT_SEED) -> list[str]:
    """`size` SFT texts (prompt + correct answer) from the task's SFT stream (held-out questions
    left out)."""
    entries = _kept(task, size, seed, heldout=False)
    return [sft_text(entry["question"], entry["answer"]) for entry in entries]


def _kept(task: DemoTask, size: int, seed: int, heldout: bool) -> list[dict[str, Any]]:
    """The first `size` entries of the stream at `seed` whose question is (``heldout``) or is not
    held out; every entry when the task holds nothing out."""
    if task.heldout_fraction <= 0.0:
        return task.entries(size, seed)
    share = task.heldout_fraction if heldout else 1.0 - task.heldout_fraction
    n = int(size / share * 1.2) + 100  # enough draws for `size` kept ones, checked below
    kept = [e for e in task.entries(n, seed) if task.is_heldout(e["question"]) == heldout]
    if len(kept) < size:
        raise DemoTaskError(f"{task.name}: only {len(kept)} of {n} items kept, {size} needed")
    return kept[:size]


def prompt_row(task: DemoTask, entry: dict[str, Any]) -> dict[str, Any]:
    """A prompt-file row equal to the loop's `rg:` item of `entry` (same prompt, answer and the
    metadata `reasoning_gym_reward` scores with)."""
    return {"prompt": entry["question"], "answer": str(entry["answer"]), "rg_dataset": task.name,
            "rg_config": dict(task.config), "rg_entry": entry}


def heldout_split(task: DemoTask, train_size: int, valid_size: int, out_dir: str | os.PathLike,
                  train_seed: int = TRAIN_SEED, valid_seed: int = VALID_SEED) -> dict[str, Any]:
    """Train and validation prompt files with disjoint questions (by text) → their paths and
    the overlap counts.

    Validation holds every distinct held-out question of the validation stream once (at most
    `valid_size`); training holds `train_size` items of the other questions. Also reports how
    much the unfiltered streams overlap: the share of `valid_size` validation items whose
    question occurs among `train_size` training items.
    """
    out_dir = Path(out_dir)
    train = _kept(task, train_size, train_seed, heldout=False)
    train_questions = {e["question"] for e in train}
    seen: set[str] = set()
    valid = []
    for e in task.entries(max(valid_size, 1) * 8, valid_seed):
        q = e["question"]
        if task.is_heldout(q) and q not in train_questions and q not in seen:
            seen.add(q)
            valid.append(e)
    valid = valid[:valid_size]
    plain_train = {e["question"] for e in task.entries(train_size, train_seed)}
    plain_valid = task.entries(valid_size, valid_seed)
    overlap = sum(e["question"] in plain_train for e in plain_valid)
    paths = {}
    for split, entries in (("train", train), ("valid", valid)):
        path = out_dir / f"{split}_prompts.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for e in entries:
                f.write(json.dumps(prompt_row(task, e)) + "\n")
        paths[split] = str(path)
    return {"paths": paths, "train_items": len(train), "train_questions": len(train_questions),
            "valid_questions": len(valid),
            "valid_in_train": sum(e["question"] in train_questions for e in valid),
            "unfiltered_overlap": {"valid_items": len(plain_valid), "in_train": overlap,
                                   "share": overlap / len(plain_valid)}}


def tool_sft_text(question: str, answer: str, expression: str, chat_format: ChatFormat | None = None) -> str:
    """Prompt, the calculator call, its output and the answer copied from it: the trajectory a
    multi-turn rollout builds when the model calls the tool and answers."""
    return (render_prompt(question, chat_format) + f" {TOOL_CALL[0]}{expression}{TOOL_CALL[1]}"
            + TOOL_TEMPLATE.format(output=answer) + f" {answer}")


def tool_sft_corpus(size: int, seed: int = SFT_SEED) -> list[str]:
    return [tool_sft_text(e["question"], e["answer"], e["metadata"]["expression"])
            for e in TOOL_ARITHMETIC.entries(size, seed)]


def final_answer_reward(response: str, answer: str, metadata: dict[str, Any]) -> float:
    """1.0 when what follows the last tool output (the whole response if none) is exactly the
    answer (use as --reward-fn `sfpo_megatron.demo.task:final_answer_reward`). Without the tool
    the model writes the "output" itself, so the same reward measures its own arithmetic."""
    tail = response.rsplit(TOOL_OUTPUT[1], 1)[-1]
    return 1.0 if tail.strip() == str(answer).strip() else 0.0


def write_jsonl(texts: Sequence[str], path: str | os.PathLike, key: str = "text") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for text in texts:
            f.write(json.dumps({key: text}) + "\n")
    return path


def build_tokenizer(texts: Sequence[str], out_prefix: str | os.PathLike, vocab_size: int = 64,
                    symbols: Sequence[str] = ()) -> Path:
    """SentencePiece BPE model for the task's texts: digits single tokens, text kept verbatim.

    BPE rather than unigram: on this tiny, repetitive corpus unigram keeps only single
    characters, while BPE merges the fixed words ("Calculate", "Assistant"), which shortens every
    sequence by half. ``symbols`` (the tool demo's markers) are single pieces: one-token stop
    markers, and the same tokens wherever they occur.
    """
    return train_sentencepiece(texts, vocab_size, out_prefix, user_defined_symbols=symbols, model_type="bpe")


def exact_match_reward(response: str, answer: str, metadata: dict[str, Any]) -> float:
    """1.0 when reasoning-gym's own scorer gives full marks, else 0.0 (use as --reward-fn
    `sfpo_megatron.demo.task:exact_match_reward`).

    reasoning-gym's arithmetic scorers give partial credit when the reference is a substring of
    the response ("191" for 91 scores 2/3); the demo reports accuracy, so it rewards only exact
    answers.
    """
    return 1.0 if reasoning_gym_reward(response, answer, metadata) >= 1.0 else 0.0
