"""The records that flow from the rollout servers to the update: one home for all of them.

``Response`` (one sample a server returned) → ``ScoredGroup`` (the n scored responses of one
prompt) → ``Sample`` (one training row with its reward and advantage) → ``RolloutBatch`` (one
step's samples and their rollout metrics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Response:
    """One generated sample, as a rollout server returned it."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    output_ids: list[int]
    output_logprobs: list[float] | None
    finish_reason: dict
    weight_version: str | None
    text: str | None
    server: str
    attempts: int
    meta_info: dict = field(repr=False)

    @property
    def aborted(self) -> bool:
        return (self.finish_reason or {}).get("type") == "abort"


@dataclass
class ScoredGroup:
    """The n scored responses of one prompt."""

    item: Any  # data.prompts.PromptItem
    response_ids: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]
    texts: list[str]
    rewards: list[float] = field(default_factory=list)
    weight_version: str | None = None
    weight_versions: list[str | None] = field(default_factory=list)  # per sample
    # Multi-turn rollouts: per sample, 1 on generated tokens and 0 on tool output; and its tool use.
    loss_masks: list[list[int]] = field(default_factory=list)
    tool_stats: list[dict] = field(default_factory=list)

    @property
    def all_equal(self) -> bool:
        return len(set(self.rewards)) <= 1


@dataclass
class Sample:
    """One response to one prompt, as the rollout returned it and the reward scored it."""

    prompt_index: int  # dataset index of the prompt
    group_id: int  # samples of the same prompt in the same RL step share it
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]  # the rollout engine's logprob of each response token
    weight_version: int  # policy version that generated the response (multi-turn: its oldest turn's)
    finish_reason: str = "length"
    response_text: str = ""
    answer: Any = None
    metadata: dict = field(default_factory=dict)
    reward: float = 0.0
    advantage: float = 0.0  # sequence-level, filled in by algorithms/advantages.py
    # Per response token: 1 trains on it, 0 is context (a tool's output; its logprob is a 0.0
    # placeholder). None: every response token trains.
    loss_mask: list[int] | None = None


@dataclass
class RolloutBatch:
    """One RL step's training samples (groups contiguous) and the metrics of their rollout."""

    samples: list[Sample]
    metrics: dict[str, float] = field(default_factory=dict)
    step: int = 0  # the RL step it was generated for
    sampler_start: dict | None = None  # sampler state before its prompts were drawn (async resume)
