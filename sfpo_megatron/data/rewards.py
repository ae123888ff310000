"""Reward functions and the parallel, time-limited `RewardRunner`.

Every reward function has the signature `fn(response_text, answer, metadata) -> float`:

* `math_verify_reward`: extracts the final answer (last `\\boxed{...}`, else the last
  `<answer>...</answer>`, else the last "The answer is ..." / "Answer: ..." line) and checks it
  against the reference with math-verify (1.0 / 0.0). math-verify's own timeouts use
  `signal.alarm`, which fails outside a main thread, so they are off here: the runner enforces
  time by killing the worker process instead.
* `reasoning_gym_reward`: the task's own `score_answer` on the text inside the last
  `<answer>` tag (the whole response when there is none). The dataset is rebuilt from the item's
  metadata (`rg_dataset`, `rg_config`, `rg_entry`, see `prompts.py`). Scores are in [0, 1] and
  may be partial: the default scorer (e.g. basic_arithmetic) gives len(answer)/len(response)
  when the reference is a substring of the response, countdown gives 0.01 for a well-formed but
  wrong expression and gsm_symbolic 0.05 for a wrong number; they are passed through unchanged.
* `auto_reward`: reasoning-gym's scorer for reasoning-gym items, math-verify otherwise.
* a user function given by import path `pkg.module:func` (`resolve_reward_fn`).

`RewardRunner` scores a batch in worker processes (pebble's ProcessPool): a sample whose
function raises, returns a non-finite or non-number value, or runs past `timeout_s` scores 0.0
and is counted (`errors`, `timeouts`) and logged; a timed-out worker is killed and replaced.
"""

from __future__ import annotations

import importlib
import logging
import math
import multiprocessing
import pickle
import re
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import Any

import reasoning_gym
from math_verify import parse, verify
from pebble import ProcessPool
from reasoning_gym.utils import extract_answer

from sfpo_megatron.errors import UserError

logger = logging.getLogger(__name__)


class _DropMathVerifyTimeoutWarning(logging.Filter):
    """math-verify warns once per process that its timeouts are off; here that is intended
    (RewardRunner kills slow workers), and every replacement worker would repeat it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropMathVerifyTimeoutWarning())

RewardFn = Callable[[str, str, dict[str, Any]], float]


class RewardFunctionError(UserError):
    """A reward function spec cannot be resolved or used."""


# --------------------------------------------------------------------------- answer extraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_LINE = re.compile(
    r"^[\s*_#>-]*(?:the\s+)?(?:final\s+)?answer\s*(?:is\s*:?|:)[\s*_]*(?P<ans>.+?)\s*$",
    re.IGNORECASE | re.MULTILINE,
)


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (nested braces balanced), or None."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i]
    return None


def _clean(answer: str) -> str:
    answer = answer.strip().strip("*_ ").strip()
    if answer.endswith(".") and not answer[:-1].endswith("."):
        answer = answer[:-1]  # sentence full stop, not part of the number
    if len(answer) >= 2 and answer[0] == "$" and answer[-1] == "$":
        answer = answer.strip("$").strip()
    return answer


def extract_final_answer(text: str) -> str | None:
    """The final answer of a response: last \\boxed{}, else last <answer> tag, else last answer line."""
    boxed = last_boxed(text)
    if boxed is not None:
        return _clean(boxed)
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return _clean(tags[-1])
    lines = list(_ANSWER_LINE.finditer(text))
    if lines:
        return _clean(lines[-1].group("ans"))
    return None


# --------------------------------------------------------------------------- reward functions


def _parse_math(answer: str) -> list:
    # Boxing makes math-verify read the whole string as one LaTeX answer (e.g. \sqrt{2}, \{1,2\}).
    return parse("\\boxed{" + answer + "}", parsing_timeout=None)


def math_verify_reward(response: str, answer: str, metadata: dict[str, Any] | None = None) -> float:
    """1.0 if the response's final answer equals `answer` by math-verify, else 0.0.

    A response without an extractable final answer scores 0.0. The reference may itself contain
    a `\\boxed{}` (e.g. a full MATH solution); its last one is used.
    """
    predicted = extract_final_answer(response)
    if not predicted:
        return 0.0
    gold_text = last_boxed(str(answer))
    gold_text = _clean(gold_text if gold_text is not None else str(answer))
    gold, pred = _parse_math(gold_text), _parse_math(predicted)
    if not gold or not pred:
        # Not mathematics math-verify can read (e.g. a word): exact text match.
        return float(gold_text == predicted)
    return float(verify(gold, pred, timeout_seconds=None))


_RG_DATASETS: dict[tuple[str, str], Any] = {}
_RG_LOCK = threading.Lock()


def _rg_dataset(name: str, config: dict[str, Any]) -> Any:
    """The reasoning-gym dataset of an item, built once per process (creation is lazy and cheap)."""
    key = (name, repr(sorted(config.items())))
    with _RG_LOCK:
        if key not in _RG_DATASETS:
            _RG_DATASETS[key] = reasoning_gym.create_dataset(name, **config)
        return _RG_DATASETS[key]


def reasoning_gym_reward(response: str, answer: str, metadata: dict[str, Any]) -> float:
    """The reasoning-gym task's own score (possibly partial, see the module docstring)."""
    try:
        name, config, entry = metadata["rg_dataset"], metadata["rg_config"], metadata["rg_entry"]
    except (KeyError, TypeError) as exc:
        raise RewardFunctionError(
            f"reasoning_gym_reward needs a reasoning-gym item (metadata with rg_dataset, rg_config, "
            f"rg_entry), got metadata keys {sorted(metadata) if isinstance(metadata, dict) else metadata!r}"
        ) from exc
    extracted = extract_answer(response)
    candidate = extracted if extracted is not None else response.strip()
    return float(_rg_dataset(name, config).score_answer(candidate, entry))


def auto_reward(response: str, answer: str, metadata: dict[str, Any]) -> float:
    """reasoning-gym's scorer for reasoning-gym items, math-verify for everything else."""
    if isinstance(metadata, dict) and "rg_entry" in metadata:
        return reasoning_gym_reward(response, answer, metadata)
    return math_verify_reward(response, answer, metadata)


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "auto": auto_reward,
    "math": math_verify_reward,
    "math_verify": math_verify_reward,
    "rg": reasoning_gym_reward,
    "reasoning_gym": reasoning_gym_reward,
}


def resolve_reward_fn(spec: str | RewardFn) -> RewardFn:
    """A built-in name (`auto`, `math`, `rg`), an import path `pkg.module:func`, or a callable."""
    if callable(spec):
        return spec
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RewardFunctionError(
            f"reward function {spec!r} is neither a built-in ({', '.join(sorted(BUILTIN_REWARDS))}) "
            "nor an import path of the form pkg.module:func"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardFunctionError(f"reward function {spec!r}: cannot import {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardFunctionError(f"reward function {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardFunctionError(f"reward function {spec!r} is not callable ({type(obj).__name__})")
    return obj


# --------------------------------------------------------------------------- parallel runner


def _call_reward(fn: RewardFn, response: str, answer: str, metadata: dict[str, Any]) -> float:
    """Runs in a worker: the reward as a finite float (anything else is an error)."""
    value = fn(response, answer, metadata)
    if isinstance(value, bool):
        value = float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RewardFunctionError(f"reward function returned {value!r}; expected a finite number")
    return float(value)


def _stop_pool(pool: Any) -> None:
    pool.stop()
    pool.join()


class RewardRunner:
    """Scores batches in `num_workers` processes, each sample limited to `timeout_s` seconds.

    The reward function must be picklable by reference (a module-level function, given as the
    object or as `pkg.module:func`), because workers import it. The timeout counts from the
    moment a worker starts the sample; a worker running past it is terminated (then killed) and
    replaced, so a hanging function costs at most `timeout_s` per sample and never leaks a stuck
    process. Workers come from a forkserver so that a trainer holding threads and a large model
    is never forked (so, as with any non-fork start method, an entry script needs the usual
    `if __name__ == "__main__":` guard). Starting the workers and their first imports
    (math-verify, reasoning-gym) takes a few seconds, once per runner and again for a worker
    that replaces a killed one; build one runner per run and reuse it.
    """

    def __init__(
        self,
        fn: str | RewardFn = "auto",
        num_workers: int = 2,
        timeout_s: float = 10.0,
        mp_context: str = "forkserver",
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.fn = resolve_reward_fn(fn)
        try:
            pickle.dumps(self.fn)
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            raise RewardFunctionError(
                f"reward function {self.fn!r} cannot be sent to worker processes ({exc}); "
                "define it at module level and pass it or its pkg.module:func path"
            ) from exc
        self.name = getattr(self.fn, "__qualname__", repr(self.fn))
        self.timeout_s = float(timeout_s)
        self.num_workers = num_workers
        self.calls = 0
        self.errors = 0
        self.timeouts = 0
        self._pool = ProcessPool(max_workers=num_workers, context=multiprocessing.get_context(mp_context))
        self._lock = threading.Lock()  # one batch at a time; the counters stay per call
        # Workers are stopped even if close() is never called.
        self._finalizer = weakref.finalize(self, _stop_pool, self._pool)

    def score(
        self,
        responses: Sequence[str],
        answers: Sequence[str],
        metadatas: Sequence[dict[str, Any]] | None = None,
    ) -> list[float]:
        """One reward per response; failed or timed-out samples get 0.0."""
        return self.score_counted(responses, answers, metadatas)[0]

    def score_counted(
        self,
        responses: Sequence[str],
        answers: Sequence[str],
        metadatas: Sequence[dict[str, Any]] | None = None,
    ) -> tuple[list[float], int, int]:
        """(rewards, errors, timeouts) of this call alone: threads sharing the runner (the
        asynchronous rollout producer and the evaluation) each get their own counts."""
        with self._lock:
            errors, timeouts = self.errors, self.timeouts
            rewards = self._score(responses, answers, metadatas)
            return rewards, self.errors - errors, self.timeouts - timeouts

    def _score(
        self,
        responses: Sequence[str],
        answers: Sequence[str],
        metadatas: Sequence[dict[str, Any]] | None,
    ) -> list[float]:
        if metadatas is None:
            metadatas = [{} for _ in responses]
        if not len(responses) == len(answers) == len(metadatas):
            raise ValueError(
                f"responses ({len(responses)}), answers ({len(answers)}) and metadatas "
                f"({len(metadatas)}) must have the same length"
            )
        if not self._finalizer.alive:
            raise RuntimeError("RewardRunner is closed")
        futures = [
            self._pool.schedule(_call_reward, args=(self.fn, r, a, m), timeout=self.timeout_s)
            for r, a, m in zip(responses, answers, metadatas)
        ]
        rewards = []
        for i, future in enumerate(futures):
            self.calls += 1
            try:
                rewards.append(future.result())
            except FutureTimeoutError:
                self.timeouts += 1
                logger.warning("reward %s timed out after %.1f s on sample %d", self.name, self.timeout_s, i)
                rewards.append(0.0)
            except Exception as exc:  # the user function's error, or a crashed worker
                self.errors += 1
                logger.warning(
                    "reward %s failed on sample %d: %s: %s\n%s",
                    self.name, i, type(exc).__name__, exc, getattr(exc, "traceback", ""),
                )
                rewards.append(0.0)
        return rewards

    __call__ = score

    def stats(self) -> dict[str, int]:
        return {"calls": self.calls, "errors": self.errors, "timeouts": self.timeouts}

    def close(self) -> None:
        """Stops the workers (killing any still running)."""
        self._finalizer()

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
