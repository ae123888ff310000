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
* `math_reference_reward` (`math-reference`): the SFPO reference code's scorer, for reproducing
  the paper's numbers: only the last `\\boxed{...}` counts; 1.0 when it equals the ground
  truth, the format score (default 0.1) when it is boxed but wrong, 0.0 without a box. In
  evaluation, scores below `eval_score_floor` (0.95) count 0, as the reference's validation does.
* `auto_reward`: reasoning-gym's scorer for reasoning-gym items, math-verify otherwise.
* a user function given by import path `pkg.module:func` (`resolve_reward_fn`).

A reward function may carry an `eval_score_floor` attribute: evaluation (`rl/evaluate.py`) then
counts every score below it as 0 (a training-only partial credit, such as a format score, does not
reach the accuracy).

`RewardRunner` scores a batch in worker processes (pebble's ProcessPool): a sample whose
function raises, returns a non-finite or non-number value, or runs past `timeout_s` scores 0.0
and is counted (`errors`, `timeouts`) and logged; a timed-out worker is killed and replaced.
The workers leave the trainer's process group: a SIGTERM sent to the whole group (a Slurm time
limit, `kill -TERM -PGID`) is the trainer's, which finishes its step and checkpoints with them.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import pickle
import re
import signal
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


# The SFPO reference's defaults (latex_math.compute_score's format_score; the 0.95 at which its
# validation stops counting a score, "ignore the format score").
REFERENCE_FORMAT_SCORE = 0.1
REFERENCE_EVAL_SCORE_FLOOR = 0.95


def reference_boxed_answer(text: str) -> str | None:
    """The answer the SFPO reference extracts: the content of the last ``\\boxed{...}``.

    Follows ``last_boxed_only_string`` + ``remove_boxed`` of the reference's
    ``verl/utils/reward_score/latex_math.py``, quirks included:

    * if the text contains ``\\boxed `` (with a space) anywhere, the answer is what follows the
      last ``\\boxed `` up to the next ``$`` (or the end), whatever braces come later;
    * otherwise the last ``\\boxed``, its braces balanced from there; a box whose text does not
      continue with ``{`` right after ``\\boxed`` (e.g. ``\\fbox{..}``, ``\\boxed\\frac..``),
      or whose braces never close, gives None.
    """
    if "\\boxed " in text:
        return text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        # The reference falls back to the last \fbox, then rejects it (not "\boxed{"): no answer.
        return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                box = text[start:i + 1]
                return box[len("\\boxed{"):-1] if box.startswith("\\boxed{") else None
    return None


def _dollar_wrapped(answer: str) -> str:
    """``$answer$`` as the reference's ``wrap_math_in_latex`` makes it (no stripping: its
    ``strip()`` result is discarded; an existing leading or trailing ``$`` is kept)."""
    answer = str(answer)
    if not answer.startswith("$"):
        answer = "$" + answer
    if not answer.endswith("$"):
        answer = answer + "$"
    return answer


def math_reference_reward(response: str, answer: str, metadata: dict[str, Any] | None = None,
                          format_score: float = REFERENCE_FORMAT_SCORE) -> float:
    """The SFPO reference's score (``--reward-fn math-reference``), for reproducing its tables.

    Mirrors ``compute_score`` of ``Code/SFPO/verl/utils/reward_score/latex_math.py`` in the SFPO
    reference code (Urheen/SFPO), with its default ``format_score=0.1``: ``_default_compute_score``
    there routes to it the MATH training set its ``train-scripts/generate_dataset.sh`` prepares
    (data source ``xDAN2099/lighteval-MATH``), DAPO-Math-17K-cleaned and the six test sets (no
    dedicated scorer):

    * the predicted answer is :func:`reference_boxed_answer` of the response; none → 0.0;
    * both it and the ground truth (as given, no extraction) are wrapped as ``$...$``
      (``wrap_math_in_latex``) and parsed by math-verify with its default extraction;
      ``verify(parsed prediction, parsed truth)`` — the reference's argument order — true → 1.0;
    * otherwise ``format_score`` (a boxed but wrong answer; 0.1 in the reference);
    * an exception anywhere → 0.0.

    math-verify's own time limits are off here, as in :func:`math_verify_reward` (the runner
    kills slow workers instead); a case that would time out in the reference scores 0 here too.
    Evaluation counts scores below ``eval_score_floor`` (0.95) as 0, so there only a correct
    answer scores.
    """
    try:
        predicted = reference_boxed_answer(response)
        if predicted is None:
            return 0.0
        pred = parse(_dollar_wrapped(predicted), parsing_timeout=None)
        gold = parse(_dollar_wrapped(answer), parsing_timeout=None)
        return 1.0 if verify(pred, gold, timeout_seconds=None) else float(format_score)
    except Exception:  # the reference scores any failure 0
        return 0.0


math_reference_reward.eval_score_floor = REFERENCE_EVAL_SCORE_FLOOR  # type: ignore[attr-defined]


def eval_score_floor(fn: RewardFn) -> float | None:
    """Scores below this count 0 in evaluation (None: every score counts as it is)."""
    floor = getattr(fn, "eval_score_floor", None)
    if floor is None and isinstance(fn, functools.partial):
        floor = getattr(fn.func, "eval_score_floor", None)
    return None if floor is None else float(floor)


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
    "math-reference": math_reference_reward,
    "rg": reasoning_gym_reward,
    "reasoning_gym": reasoning_gym_reward,
}


def resolve_reward_fn(spec: str | RewardFn, *, format_score: float | None = None) -> RewardFn:
    """A built-in name (`auto`, `math`, `math-reference`, `rg`), an import path `pkg.module:func`,
    or a callable. ``format_score`` (``--reward-format-score``) sets `math-reference`'s score of a
    boxed but wrong answer; it means nothing to the other functions, which refuse it."""
    if format_score is not None:
        if spec != "math-reference":
            raise RewardFunctionError(
                f"--reward-format-score {format_score} applies to --reward-fn math-reference only, "
                f"not {spec if isinstance(spec, str) else getattr(spec, '__qualname__', spec)!r}")
        if not (math.isfinite(format_score) and 0.0 <= format_score <= 1.0):
            raise RewardFunctionError(f"--reward-format-score must be in [0, 1], got {format_score}")
        return functools.partial(math_reference_reward, format_score=float(format_score))
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


def reward_fn_from_args(args: Any) -> RewardFn:
    """The reward function ``--reward-fn`` / ``--reward-format-score`` name."""
    return resolve_reward_fn(args.reward_fn, format_score=getattr(args, "reward_format_score", None))


# --------------------------------------------------------------------------- parallel runner


def _call_reward(fn: RewardFn, response: str, answer: str, metadata: dict[str, Any]) -> float:
    """Runs in a worker: the reward as a finite float (anything else is an error)."""
    value = fn(response, answer, metadata)
    if isinstance(value, bool):
        value = float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RewardFunctionError(f"reward function returned {value!r}; expected a finite number")
    return float(value)


# The signals the trainer turns into "checkpoint, then exit" (components/preemption.py).
_GROUP_SIGNALS = {signal.SIGTERM, signal.SIGUSR1}


def _leave_process_group() -> None:
    """Worker start (pebble initializer): a process group of its own, so that only the runner,
    which kills workers one by one, stops it. The worker may start with the group signals
    blocked (inherited from a forkserver started by ``_start_forkserver``): any that arrived
    meanwhile were meant for the trainer's group and are discarded before unblocking."""
    os.setpgid(0, 0)
    for sig in signal.sigpending() & _GROUP_SIGNALS:
        signal.sigtimedwait([sig], 0)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _GROUP_SIGNALS)


def _start_forkserver() -> None:
    """Start the forkserver with the group signals blocked: it then survives a group-wide SIGTERM
    (it leaves on its own when the trainer exits), and the workers it forks start blocked until
    they have left the group."""
    # First the resource tracker: starting it unblocks SIGTERM in the calling thread.
    multiprocessing.resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _GROUP_SIGNALS)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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
        if mp_context == "forkserver":
            _start_forkserver()
        self._pool = ProcessPool(max_workers=num_workers, context=multiprocessing.get_context(mp_context),
                                 initializer=_leave_process_group)
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


def reward_runner_from_args(args: Any) -> RewardRunner:
    """The run's runner from ``--reward-fn``, ``--reward-num-workers``, ``--reward-timeout``."""
    return RewardRunner(reward_fn_from_args(args), args.reward_num_workers, args.reward_timeout)
