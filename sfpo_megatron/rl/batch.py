"""What one rollout produces and the RL update consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """One response to one prompt, as the rollout returned it and the reward scored it."""

    prompt_index: int  # dataset index of the prompt
    group_id: int  # samples of the same prompt in the same RL step share it
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]  # the rollout engine's logprob of each response token
    weight_version: int  # policy version that generated the response
    finish_reason: str = "length"
    response_text: str = ""
    answer: Any = None
    metadata: dict = field(default_factory=dict)
    reward: float = 0.0
    advantage: float = 0.0  # sequence-level, filled in by rl/advantages.py
