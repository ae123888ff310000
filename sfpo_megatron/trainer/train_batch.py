"""Rollout samples → padded training tensors, and how one RL update splits them.

Token layout (one row per sample, right-padded; megatron's RoPE ignores ``position_ids``, so the
real tokens must start at position 0)::

    tokens     p0 p1 p2 r0 r1 r2 PAD PAD          prompt + response, then pad_id
    labels     p1 p2 r0 r1 r2 PAD PAD PAD         labels[:, t] = tokens[:, t + 1]
    loss_mask  0  1  1  1  0  0   0   0           True where labels[:, t] is a response token
                                                  (multi-turn: a generated one, not a tool's)

Every ``[B, S]`` per-token tensor (``loss_mask``, rollout / old / reference log-probs) is aligned
with ``labels``: position t holds the prediction of ``tokens[:, t + 1]`` from ``tokens[:, :t + 1]``.
Causal attention never lets a real token see the padding on its right, so no attention mask is
needed. All rows of one update share one sequence length ``S`` (the longest sample, rounded up
to ``pad_to_multiple``): pipeline parallelism sends fixed ``[S, micro_batch, hidden]`` tensors.

An update over a global batch of B samples (identical on every rank) is split as

    B  →  ``num_mini_batches`` contiguous mini-batches (one optimizer step each)
       →  each mini-batch into ``dp_size`` contiguous shards (this rank keeps shard ``dp_rank``)
       →  each shard into micro-batches of ``micro_batch_size`` rows.

With ``--use-dynamic-batch-size`` the last two splits are token-based instead (balanced DP
shards, packed micro-batches of at most ``--max-tokens-per-gpu`` tokens: ``trainer/packing.py``);
these padded rows stay what the loss reads. ``lengths`` (prompt + response per row) is what the
packing reads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch

from sfpo_megatron.errors import UserError
from sfpo_megatron.records import Sample


class TrainBatchError(UserError):
    """Samples or a batch layout that cannot be turned into training tensors."""


# Per-row tensors: [B] or [B, S]; ``None`` for log-probs not computed (yet / on this PP stage).
_ROW_FIELDS = ("tokens", "labels", "loss_mask", "advantages", "rollout_logprobs", "group_ids",
               "weight_versions", "old_logprobs", "ref_logprobs", "rewards", "log_weights", "lengths")
_SEQ_FIELDS = ("tokens", "labels", "loss_mask", "rollout_logprobs", "old_logprobs", "ref_logprobs")


@dataclass
class TrainBatch:
    tokens: torch.Tensor  # [B, S] long
    labels: torch.Tensor  # [B, S] long
    loss_mask: torch.Tensor  # [B, S] bool
    advantages: torch.Tensor  # [B] float32, one per response
    rollout_logprobs: torch.Tensor  # [B, S] float32, the rollout engine's, 0 off the mask
    group_ids: torch.Tensor  # [B] long
    weight_versions: torch.Tensor  # [B] long
    old_logprobs: torch.Tensor | None = None  # [B, S] at θ(s,0), the PPO reference
    ref_logprobs: torch.Tensor | None = None  # [B, S] of the frozen reference policy (KL)
    rewards: torch.Tensor | None = None  # [B] float32, the scored rewards (OPOB needs them)
    log_weights: torch.Tensor | None = None  # [B] float64 log w_i = sum_t (old - rollout) (VCPO)
    lengths: torch.Tensor | None = None  # [B] long, prompt + response tokens (set by collate)

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2:
            raise TrainBatchError(f"tokens must be [B, S], got {tuple(self.tokens.shape)}")
        b, s = self.tokens.shape
        for name in _SEQ_FIELDS[1:]:
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (b, s):
                raise TrainBatchError(f"{name} must be [B={b}, S={s}], got {tuple(t.shape)}")
        for name in ("advantages", "group_ids", "weight_versions", "rewards", "log_weights",
                     "lengths"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (b,):
                raise TrainBatchError(f"{name} must be [B={b}], got {tuple(t.shape)}")

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_length(self) -> int:
        return self.tokens.shape[1]

    @property
    def num_response_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def slice(self, start: int, end: int) -> TrainBatch:
        return replace(self, **{f: None if getattr(self, f) is None else getattr(self, f)[start:end]
                                for f in _ROW_FIELDS})

    def index_select(self, index: Sequence[int], seq_length: int | None = None) -> TrainBatch:
        """Rows ``index`` (in that order), their ``[., S]`` tensors cut to ``seq_length``."""
        idx = torch.tensor(list(index), dtype=torch.long)
        cut = self.seq_length if seq_length is None else seq_length
        out = {}
        for f in _ROW_FIELDS:
            t = getattr(self, f)
            if t is not None:
                t = t.index_select(0, idx)
                if f in _SEQ_FIELDS:
                    t = t[:, :cut]
            out[f] = t
        return replace(self, **out)

    def split(self, parts: int, what: str = "parts") -> list[TrainBatch]:
        """``parts`` contiguous, equal slices (an error names the sizes when they do not divide)."""
        if parts < 1 or self.size % parts:
            raise TrainBatchError(f"a batch of {self.size} samples does not split into {parts} "
                                  f"equal {what}")
        per = self.size // parts
        return [self.slice(i * per, (i + 1) * per) for i in range(parts)]

    @staticmethod
    def concat(batches: Sequence[TrainBatch]) -> TrainBatch:
        if not batches:
            raise TrainBatchError("cannot concatenate an empty list of batches")
        lengths = {b.seq_length for b in batches}
        if len(lengths) > 1:
            raise TrainBatchError(f"batches padded to different lengths {sorted(lengths)}")
        out = {}
        for f in fields(TrainBatch):
            values = [getattr(b, f.name) for b in batches]
            if all(v is None for v in values):
                out[f.name] = None
            elif any(v is None for v in values):
                raise TrainBatchError(f"{f.name} is set on some batches and not on others")
            else:
                out[f.name] = torch.cat(values)
        return TrainBatch(**out)

    def micro_batches(self, micro_batch_size: int) -> list[TrainBatch]:
        if micro_batch_size < 1 or self.size % micro_batch_size:
            raise TrainBatchError(f"a shard of {self.size} samples does not split into "
                                  f"micro-batches of --micro-batch-size {micro_batch_size}")
        return self.split(self.size // micro_batch_size, "micro-batches")


def check_update_layout(batch_size: int, num_mini_batches: int, dp_size: int,
                        micro_batch_size: int) -> None:
    """Errors name the numbers: B must split into mini-batches, DP shards and micro-batches."""
    if num_mini_batches < 1:
        raise TrainBatchError(f"--num-steps-per-rollout must be >= 1, got {num_mini_batches}")
    if batch_size % num_mini_batches:
        raise TrainBatchError(f"rollout batch of {batch_size} samples is not divisible by "
                              f"--num-steps-per-rollout {num_mini_batches}")
    per = batch_size // num_mini_batches
    if per % (dp_size * micro_batch_size):
        raise TrainBatchError(
            f"mini-batch of {per} samples ({batch_size} / --num-steps-per-rollout "
            f"{num_mini_batches}) is not divisible by data-parallel size {dp_size} x "
            f"--micro-batch-size {micro_batch_size} = {dp_size * micro_batch_size}")


def local_mini_batches(batch: TrainBatch, num_mini_batches: int, dp_rank: int,
                       dp_size: int) -> list[TrainBatch]:
    """This DP rank's shard of each mini-batch, in optimizer-step order."""
    return [mb.split(dp_size, "data-parallel shards")[dp_rank]
            for mb in batch.split(num_mini_batches, "mini-batches")]


def _padded_length(longest: int, pad_to_multiple: int) -> int:
    return int(math.ceil(longest / pad_to_multiple) * pad_to_multiple)


def collate(samples: Sequence[Sample], pad_id: int, *, pad_to_multiple: int = 8,
            seq_length: int | None = None) -> TrainBatch:
    """Right-padded tensors for ``samples`` (see the module doc for the layout).

    ``seq_length`` fixes S (it must hold the longest sample); by default S is the longest
    prompt + response rounded up to ``pad_to_multiple``.
    """
    if not samples:
        raise TrainBatchError("collate needs at least one sample")
    if pad_to_multiple < 1:
        raise TrainBatchError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    if pad_id < 0:
        raise TrainBatchError(f"pad_id must be a token id >= 0, got {pad_id}")
    for i, s in enumerate(samples):
        if not s.prompt_ids:
            raise TrainBatchError(f"sample {i} (prompt {s.prompt_index}) has an empty prompt: "
                                  "its first response token would have no context")
        if len(s.rollout_logprobs) != len(s.response_ids):
            raise TrainBatchError(
                f"sample {i} (prompt {s.prompt_index}) has {len(s.response_ids)} response tokens "
                f"but {len(s.rollout_logprobs)} rollout logprobs")
        if s.loss_mask is not None and len(s.loss_mask) != len(s.response_ids):
            raise TrainBatchError(
                f"sample {i} (prompt {s.prompt_index}) has {len(s.response_ids)} response tokens "
                f"but a loss mask of {len(s.loss_mask)}")
        if min(s.prompt_ids + s.response_ids) < 0:
            raise TrainBatchError(f"sample {i} (prompt {s.prompt_index}) has a negative token id")
        if not math.isfinite(s.advantage):
            raise TrainBatchError(f"sample {i} (prompt {s.prompt_index}) has advantage "
                                  f"{s.advantage}")
    longest = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    if seq_length is None:
        seq_length = _padded_length(longest, pad_to_multiple)
    elif seq_length < longest:
        i = max(range(len(samples)),
                key=lambda j: len(samples[j].prompt_ids) + len(samples[j].response_ids))
        raise TrainBatchError(f"sample {i} has {longest} prompt + response tokens, more than the "
                              f"sequence length {seq_length}")
    b = len(samples)
    tokens = torch.full((b, seq_length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((b, seq_length), dtype=torch.bool)
    rollout = torch.zeros((b, seq_length), dtype=torch.float32)
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        tokens[i, :p + r] = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
        # labels[:, t] = tokens[:, t + 1]: response token j is the label of position p - 1 + j.
        # A multi-turn sample's tool-output tokens are context: off the mask, no logprob.
        if r:
            keep = (torch.ones(r, dtype=torch.bool) if s.loss_mask is None
                    else torch.tensor(s.loss_mask, dtype=torch.bool))
            loss_mask[i, p - 1:p - 1 + r] = keep
            rollout[i, p - 1:p - 1 + r] = torch.tensor(s.rollout_logprobs, dtype=torch.float32) * keep
    labels = torch.full_like(tokens, pad_id)
    labels[:, :-1] = tokens[:, 1:]
    return TrainBatch(
        tokens=tokens, labels=labels, loss_mask=loss_mask,
        advantages=torch.tensor([float(s.advantage) for s in samples], dtype=torch.float32),
        rollout_logprobs=rollout,
        group_ids=torch.tensor([s.group_id for s in samples], dtype=torch.long),
        weight_versions=torch.tensor([s.weight_version for s in samples], dtype=torch.long),
        rewards=torch.tensor([float(s.reward) for s in samples], dtype=torch.float32),
        lengths=torch.tensor([len(s.prompt_ids) + len(s.response_ids) for s in samples],
                             dtype=torch.long))
