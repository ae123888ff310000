"""Reward functions for the RL loop tests (imported by the reward worker processes by path)."""

from __future__ import annotations

import os
import time
from typing import Any


def has_letter_o(response: str, answer: str, metadata: dict[str, Any]) -> float:
    """1 when the response contains an "o": a mixed, learnable signal for a random tiny model.
    Rows marked ``explode`` raise, to exercise the loop's reward-error accounting; rows with
    ``sleep_s`` take that long (rollout batches slower than training, without using CPU)."""
    if metadata.get("explode"):
        raise RuntimeError("reward function failure requested by the test row")
    time.sleep(float(metadata.get("sleep_s", 0.0)))
    return 1.0 if "o" in response else 0.0


def answer_value(response: str, answer: str, metadata: dict[str, Any]) -> float:
    """The row's answer read as the score, whatever the response: known per-prompt scores
    (partial ones included) for checking how evaluation aggregates them."""
    return float(answer)


# Evaluation counts scores below this as 0 (the convention math-reference follows).
answer_value.eval_score_floor = 0.95


def worker_pid(response: str, answer: str, metadata: dict[str, Any]) -> float:
    """The scoring worker's process id: tells whether a reward worker was replaced."""
    return float(os.getpid())


def tool_answered(response: str, answer: str, metadata: dict[str, Any]) -> float:
    """1 when a tool's output " jumps3 over" (the calculator on "1+2") is in the trajectory."""
    return 1.0 if " jumps3 over" in response else 0.0
