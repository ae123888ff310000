"""`--reward-fn math-reference`: the SFPO reference code's scorer.

The expected scores are written by hand from the reference's rules (its
``verl/utils/reward_score/latex_math.py``: ``compute_score`` with ``format_score=0.1``):

* the answer is the content of the last ``\\boxed{...}`` (braces balanced); no such box → 0.0;
  ``\\fbox`` and an unclosed box give no answer; if the text contains ``\\boxed `` (a space),
  the answer is what follows the last ``\\boxed `` up to the next ``$``;
* answer and ground truth are wrapped in ``$...$`` and compared by math-verify
  (``verify(answer, truth)``): equal → 1.0, otherwise the format score 0.1 (boxed but wrong);
* in evaluation, scores below 0.95 count 0.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sfpo_megatron.data.rewards import math_reference_reward

# (response, ground truth, reference score, what the case shows)
TABLE = [
    ("So the total is \\boxed{42}.", "42", 1.0, "boxed, correct"),
    ("\\boxed{41}", "42", 0.1, "boxed, wrong: the format score"),
    ("The answer is 42", "42", 0.0, "unboxed: no answer at all"),
    ("Answer: 42", "42", 0.0, "answer line: not read"),
    ("<answer>42</answer>", "42", 0.0, "answer tag: not read"),
    ("$\\boxed{42}$", "42", 1.0, "boxed inside inline math"),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0, "nested braces, \\frac equal to a decimal"),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0, "decimal equal to a \\frac truth"),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", 1.0, "\\dfrac"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", 1.0, "two levels of nested braces"),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0.1, "\\frac, wrong"),
    ("\\boxed{\\frac{1}{2}", "0.5", 0.0, "braces never close: no answer"),
    ("\\boxed{5\\text{ cm}}", "5", 1.0, "units in the answer are dropped"),
    ("\\boxed{5}", "5\\text{ cm}", 1.0, "units in the truth are dropped"),
    ("\\boxed{90^\\circ}", "90", 1.0, "degrees"),
    ("\\boxed{10\\%}", "10", 1.0, "percent sign"),
    ("\\boxed{6\\text{ cm}}", "5", 0.1, "units, wrong number"),
    ("first \\boxed{1}, then \\boxed{2}", "2", 1.0, "several boxes: the last counts"),
    ("first \\boxed{1}, then \\boxed{2}", "1", 0.1, "several boxes: an earlier one does not"),
    ("\\fbox{42}", "42", 0.0, "\\fbox: no answer"),
    ("\\boxed{}", "42", 0.1, "empty box: boxed, so the format score"),
    ("so \\boxed 7$ and more", "7", 1.0, "'\\boxed ' with a space: up to the next $"),
    ("\\boxed{x = 3}", "3", 1.0, "an equation's right-hand side"),
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", 1.0, "sets"),
    ("\\boxed{1,000}", "1000", 1.0, "thousands separator"),
]


@pytest.mark.parametrize(("response", "truth", "expected", "why"), TABLE, ids=[t[3] for t in TABLE])
def test_reference_scores(response: str, truth: str, expected: float, why: str) -> None:
    assert math_reference_reward(response, truth, {}) == expected, why


@pytest.mark.parametrize("format_score", [0.0, 0.25])
def test_format_score_only_changes_boxed_wrong_answers(format_score: float) -> None:
    for response, truth, expected, why in TABLE:
        want = format_score if expected == 0.1 else expected
        assert math_reference_reward(response, truth, {}, format_score=format_score) == want, why


def test_evaluation_floor_is_the_references() -> None:
    """Evaluation counts scores below the function's floor as 0 (tests/test_eval_average.py runs
    it): 0.95, so the format score never reaches an accuracy and a correct answer does."""
    assert math_reference_reward.eval_score_floor == 0.95


@pytest.mark.flags("--reward-fn", "--reward-format-score")
def test_command_line_selects_the_scorer_and_its_format_score() -> None:
    """What `rl` / `eval` score with, from their real parser."""
    from sfpo_megatron.arguments import build_rl_parser
    from sfpo_megatron.data.rewards import reward_fn_from_args

    def fn(*flags: str):
        return reward_fn_from_args(build_rl_parser().parse_args(["--model-config", "m", *flags]))

    boxed_wrong, unboxed_right = ("\\boxed{41}", "42"), ("The answer is 42", "42")
    assert fn("--reward-fn", "math-reference")(*boxed_wrong, {}) == 0.1
    assert fn("--reward-fn", "math-reference")(*unboxed_right, {}) == 0.0
    assert fn("--reward-fn", "math-reference", "--reward-format-score", "0")(*boxed_wrong, {}) == 0.0
    assert fn("--reward-fn", "math-reference", "--reward-format-score", "0.3")(*boxed_wrong, {}) == 0.3
    # The lenient default scorer reads the unboxed answer.
    assert fn("--reward-fn", "math")(*unboxed_right, {}) == 1.0


@pytest.mark.flags("--reward-format-score")
@pytest.mark.parametrize(("flags", "message"), [
    (["--reward-format-score", "0.2"],
     "--reward-format-score 0.2 applies to --reward-fn math-reference only, not 'auto'"),
    (["--reward-fn", "math", "--reward-format-score", "0.1"],
     "--reward-format-score 0.1 applies to --reward-fn math-reference only, not 'math'"),
    (["--reward-fn", "math-reference", "--reward-format-score", "1.5"],
     "--reward-format-score must be in [0, 1], got 1.5"),
])
@pytest.mark.parametrize("command", ["rl", "eval"])
def test_bad_format_score_fails_before_anything_starts(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       command: str, flags: list[str],
                                                       message: str) -> None:
    from sfpo_megatron.cli import main

    argv = [command, "--model-config", str(tmp_path), "--prompt-data", "p.jsonl"] if command == "rl" else \
        [command, "--model-config", str(tmp_path), "--eval-prompt-data", "x=y.jsonl",
         "--hf-checkpoint", str(tmp_path)]
    assert main(argv + flags) == 2
    assert capsys.readouterr().err == f"sfpo-megatron {command}: error: {message}\n"
