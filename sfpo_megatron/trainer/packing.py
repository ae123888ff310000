"""Token-budget micro-batches (``--use-dynamic-batch-size --max-tokens-per-gpu N``).

The plan (pure functions on token counts, computed identically on every rank from the whole
batch, so no communication):

1. :func:`balance_over_dp`: a mini-batch's samples → one shard per DP rank, equal sample counts
   (every per-row collective of the update — VCPO's ESS, OPOB's all-gather — keeps its shapes),
   token counts within one longest sequence of each other;
2. :func:`first_fit_decreasing`: each shard → micro-batches of at most N tokens;
3. :func:`equalize`: every DP rank gets the same number of micro-batches (megatron's schedule
   runs the same count everywhere, and the loss is scaled by it): ranks with fewer split their
   fullest multi-sequence micro-batch (with equal sample counts there always is one), or, when
   none is left to split, run an empty one (padding only, whose loss is zero).

The tensors (:func:`pack_rows`): a micro-batch's sequences concatenated into one ``[1, T]`` row
(megatron's THD layout) with ``cu_seqlens``; attention and RoPE restart at every sequence
(``PackedSeqParams``, built by ``trainer/policy_forward.py``). Per-token results come back in
the rows' usual ``[n, S]`` layout (:meth:`PackedMicroBatch.unpack`), so the loss and every
``[B, S]`` tensor of the update are the same as without packing::

    packed tokens   a0 a1 a2 a3 | b0 b1 | c0 c1 c2 | PAD PAD      cu_seqlens 0 4 6 9 11
    packed labels   a1 a2 a3 -- | b1 -- | c1 c2 -- | --  --       (-- : no label, masked)

Padding (``T`` rounded up to ``multiple``, or to the fixed budget under pipeline parallelism,
whose p2p tensors have one shape) is one more segment of its own, so no real token attends to it.
Under context parallelism each sequence is also padded, inside its own segment (after its last
token, so causal attention never reaches it), to a multiple of 2 x CP: its 2 x CP chunks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from sfpo_megatron.trainer.train_batch import TrainBatch, TrainBatchError


class PackingError(TrainBatchError):
    """A batch that cannot be packed into the token budget."""


def check_budget(lengths: Sequence[int], max_tokens: int) -> None:
    if max_tokens < 1:
        raise PackingError(f"--max-tokens-per-gpu must be >= 1, got {max_tokens}")
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise PackingError(f"sample {i} has {n} tokens (prompt + response), more than "
                               f"--max-tokens-per-gpu {max_tokens}")


def balance_over_dp(lengths: Sequence[int], dp_size: int) -> list[list[int]]:
    """Sample indices of each DP rank's shard (ascending), ``len(lengths) / dp_size`` each.

    Sorted round-robin: samples in decreasing length, ``dp_size`` at a time, the longest of each
    round to the lightest rank. Chosen over Karmarkar–Karp because it keeps equal sample counts
    (see the module doc) with a one-line bound: if the loads differ by at most M (the longest
    sequence) before a round, pairing the round's longest sample with the lightest rank keeps
    them within M after it. Karmarkar–Karp balances tighter on average, but the leftover
    imbalance here is already below one sequence, which no packing can beat in the worst case.
    """
    n = len(lengths)
    if dp_size < 1 or n % dp_size:
        raise PackingError(f"a mini-batch of {n} samples does not split into data-parallel "
                           f"size {dp_size} equal shards")
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    loads = [0] * dp_size
    shards: list[list[int]] = [[] for _ in range(dp_size)]
    for start in range(0, n, dp_size):
        lightest = sorted(range(dp_size), key=lambda k: (loads[k], k))
        for i, k in zip(order[start:start + dp_size], lightest):
            shards[k].append(i)
            loads[k] += lengths[i]
    return [sorted(s) for s in shards]


def first_fit_decreasing(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Bins of positions into ``lengths`` with at most ``max_tokens`` tokens each (first-fit
    decreasing: at most 11/9 OPT + 1 bins, and simple to reason about)."""
    check_budget(lengths, max_tokens)
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for b, load in enumerate(loads):
            if load + lengths[i] <= max_tokens:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return [sorted(b) for b in bins]


def _split(items: list[int], lengths: Sequence[int]) -> tuple[list[int], list[int]]:
    halves: tuple[list[int], list[int]] = ([], [])
    loads = [0, 0]
    for i in sorted(items, key=lambda j: (-lengths[j], j)):
        k = 0 if loads[0] <= loads[1] else 1
        halves[k].append(i)
        loads[k] += lengths[i]
    return sorted(halves[0]), sorted(halves[1])


def equalize(per_rank: list[list[list[int]]],
             shard_lengths: Sequence[Sequence[int]]) -> list[list[list[int]]]:
    """Every rank's micro-batch list (positions into its ``shard_lengths[rank]``) grown to the
    longest list's count: split the fullest micro-batch that holds two or more sequences, else
    append an empty micro-batch ``[]``."""
    target = max(len(bins) for bins in per_rank)
    out = []
    for bins, lengths in zip(per_rank, shard_lengths):
        bins = [list(b) for b in bins]
        while len(bins) < target:
            splittable = [b for b in range(len(bins)) if len(bins[b]) > 1]
            if not splittable:
                bins.append([])
                continue
            b = max(splittable, key=lambda j: (sum(lengths[i] for i in bins[j]), -j))
            bins[b:b + 1] = list(_split(bins[b], lengths))
        out.append(bins)
    return out


def pack_shards(shard_lengths: Sequence[Sequence[int]], max_tokens: int) -> list[list[list[int]]]:
    """Per rank, its micro-batches as positions into its own ``shard_lengths[rank]``, the same
    count on every rank."""
    return equalize([first_fit_decreasing(ls, max_tokens) for ls in shard_lengths], shard_lengths)


def plan_micro_batches(lengths: Sequence[int], max_tokens: int,
                       dp_size: int) -> list[list[list[int]]]:
    """A mini-batch's plan: for each DP rank, its micro-batches as lists of sample indices
    (into ``lengths``); ``[]`` is an empty micro-batch. Every sample is in exactly one
    micro-batch, every micro-batch holds at most ``max_tokens`` tokens, every rank has the same
    number of micro-batches and the same number of samples."""
    check_budget(lengths, max_tokens)
    shards = balance_over_dp(lengths, dp_size)
    packed = pack_shards([[lengths[i] for i in s] for s in shards], max_tokens)
    return [[[shard[p] for p in mb] for mb in bins] for shard, bins in zip(shards, packed)]


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackSpec:
    """How micro-batches are padded: ``T`` rounded up to ``multiple`` (TP size: sequence
    parallelism splits T; and 2 x CP), or exactly ``fixed_length`` (pipeline parallelism); each
    sequence to ``segment_multiple`` (2 x CP)."""

    max_tokens: int
    pad_id: int
    multiple: int = 1
    fixed_length: int | None = None
    # Context parallelism: every sequence padded to a multiple of 2 x CP (its 2 x CP chunks)
    segment_multiple: int = 1

    def segment_length(self, tokens: int) -> int:
        """A sequence's length in the pack (its own padding included)."""
        return -(-tokens // self.segment_multiple) * self.segment_multiple

    def padded_length(self, tokens: int) -> int:
        if self.fixed_length is not None:
            return self.fixed_length
        tokens = max(tokens, 1)
        return -(-tokens // self.multiple) * self.multiple


def pack_spec(max_tokens: int, pad_id: int, tp_size: int, pp_size: int, cp_size: int = 1) -> PackSpec:
    segment = 2 * cp_size if cp_size > 1 else 1
    multiple = math.lcm(tp_size, segment)
    fixed = -(-max_tokens // multiple) * multiple if pp_size > 1 else None
    return PackSpec(max_tokens=max_tokens, pad_id=pad_id, multiple=multiple, fixed_length=fixed,
                    segment_multiple=segment)


@dataclass
class PackedMicroBatch:
    """One micro-batch of packed sequences. ``rows``: the same samples in the padded ``[n, S]``
    layout (cut to their longest), which the loss reads; ``index``: their rows in the batch they
    were packed from (empty for an empty micro-batch, whose ``rows`` is one all-masked row)."""

    rows: TrainBatch
    index: list[int]
    tokens: torch.Tensor  # [1, T] long
    labels: torch.Tensor  # [1, T] long
    position_ids: torch.Tensor  # [1, T] long, restarting at 0 in every sequence
    cu_seqlens: torch.Tensor  # [segments + 1] int32, padding included as a segment
    max_seqlen: int
    real_tokens: int
    _gather: torch.Tensor  # [n, S] long: packed position of row token (i, t)
    _valid: torch.Tensor  # [n, S] bool: t < length of row i

    @property
    def seq_length(self) -> int:
        return self.tokens.shape[1]

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """Per-token ``[1, T]`` (or ``[T]``) packed values → ``[n, S]`` rows, 0 past each row."""
        flat = values.reshape(-1)
        gather, valid = self._gather.to(flat.device), self._valid.to(flat.device)
        return torch.where(valid, flat[gather], torch.zeros((), dtype=flat.dtype, device=flat.device))


def row_lengths(batch: TrainBatch) -> list[int]:
    """Tokens of each row (prompt + response); the whole row where the batch does not say."""
    if batch.lengths is None:
        return [batch.seq_length] * batch.size
    return [int(x) for x in batch.lengths.tolist()]


def pack_rows(batch: TrainBatch, index: Sequence[int], spec: PackSpec) -> PackedMicroBatch:
    """The rows ``index`` of ``batch`` as one packed micro-batch (``index`` empty: an empty
    micro-batch, one padding token with nothing to learn from)."""
    index = list(index)
    lengths = row_lengths(batch)
    if index:
        lens = [lengths[i] for i in index]
        s = max(lens)
        rows = batch.index_select(index, s)
    else:
        lens, s = [], 1
        rows = batch.index_select([0], 1)
        rows.loss_mask = torch.zeros_like(rows.loss_mask)
        rows.advantages = torch.zeros_like(rows.advantages)
    real = sum(lens)
    segs = [spec.segment_length(n) for n in lens]
    if sum(segs) > spec.max_tokens:
        raise PackingError(f"micro-batch of {sum(segs)} tokens is over --max-tokens-per-gpu "
                           f"{spec.max_tokens}")
    total = spec.padded_length(sum(segs))
    if total < sum(segs):
        raise PackingError(f"micro-batch of {sum(segs)} tokens does not fit the fixed length {total}")
    tokens = torch.full((1, total), spec.pad_id, dtype=torch.long)
    labels = torch.full((1, total), spec.pad_id, dtype=torch.long)
    positions = torch.zeros((1, total), dtype=torch.long)
    gather = torch.zeros((len(lens), s), dtype=torch.long)
    valid = torch.zeros((len(lens), s), dtype=torch.bool)
    cu, offset = [0], 0
    for r, (n, seg) in enumerate(zip(lens, segs)):
        tokens[0, offset:offset + n] = rows.tokens[r, :n]
        labels[0, offset:offset + n] = rows.labels[r, :n]
        positions[0, offset:offset + seg] = torch.arange(seg)  # padding to seg: after, unseen
        gather[r, :n] = torch.arange(offset, offset + n)
        valid[r, :n] = True
        offset += seg
        cu.append(offset)
    if total > offset:  # padding: a segment of its own
        positions[0, offset:] = torch.arange(total - offset)
        cu.append(total)
    seg = [b - a for a, b in zip(cu, cu[1:])]
    return PackedMicroBatch(rows=rows, index=index, tokens=tokens, labels=labels,
                            position_ids=positions, cu_seqlens=torch.tensor(cu, dtype=torch.int32),
                            max_seqlen=max(seg), real_tokens=real, _gather=gather, _valid=valid)


def packed_tokens(plan: Sequence[Sequence[Sequence[int]]], lengths: Sequence[int],
                  spec: PackSpec) -> int:
    """Tokens the ranks forward for ``plan`` (per rank, micro-batches of sample indices)."""
    return sum(spec.padded_length(sum(spec.segment_length(lengths[i]) for i in mb))
               for bins in plan for mb in bins)


def with_lengths(batch: TrainBatch, lengths: Sequence[int]) -> TrainBatch:
    return replace(batch, lengths=torch.tensor(list(lengths), dtype=torch.long))
