"""Policy forward passes through megatron's schedules: per-token log π(label) and entropy.

Every forward goes through ``get_forward_backward_func`` so the same code runs with TP, PP
(1F1B, interleaved) and DP. On the last pipeline stage ``GPTModel`` called without labels returns
the logits ``[b, s, V/tp]`` (megatron 0.16.1 transposes its ``[s, b, V/tp]`` output back to
batch-first); :func:`sfpo_megatron.trainer.vocab_parallel.vocab_parallel_logprobs_and_entropy` turns
them into log-probs and entropies without gathering the vocabulary, at the rollout temperature
and with megatron's padded vocab columns dropped.

``loss_fn(micro_batch, logprobs, entropy)`` callbacks run on the last stage only. They return
``(loss, reported)``: the schedule divides ``loss`` by the number of micro-batches and DDP
averages gradients over DP, so a training loss must already be scaled by
``num_microbatches * dp_size`` (see ``rl/losses.py``); ``reported`` is collected per
micro-batch in the returned list.

Micro-batches are either padded rows (:class:`TrainBatch`, ``[b, S]``) or packed sequences
(:class:`~sfpo_megatron.trainer.packing.PackedMicroBatch`, ``[1, T]`` with ``cu_seqlens``, run
with megatron's ``PackedSeqParams(qkv_format="thd")``). For packed ones the log-probs and
entropies are computed on the packed logits and handed to ``loss_fn`` in the rows' ``[n, S]``
layout, so a loss never sees the difference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func

from sfpo_megatron.distributed.context_parallel import gather_packed, shard_positions
from sfpo_megatron.distributed.platform import current_platform
from sfpo_megatron.errors import UserError
from sfpo_megatron.trainer.packing import PackedMicroBatch, PackSpec, pack_rows
from sfpo_megatron.trainer.train_batch import TrainBatch
from sfpo_megatron.trainer.vocab_parallel import (
    vocab_parallel_logit_grad_sq,
    vocab_parallel_logprobs_and_entropy,
)

LossFn = Callable[[TrainBatch, torch.Tensor, torch.Tensor], tuple[torch.Tensor, Any]]
MicroBatch = TrainBatch | PackedMicroBatch
LogitsFn = Callable[[MicroBatch, torch.Tensor], tuple[torch.Tensor, Any]]


class PolicyForwardError(UserError):
    """Micro-batches the schedule cannot run (mixed shapes, none at all)."""


def _forward_step(logits_fn: LogitsFn, data_iterator, model):
    mb: MicroBatch = next(data_iterator)
    dev = current_platform().device()
    tokens = mb.tokens.to(dev, non_blocking=True)
    if isinstance(mb, PackedMicroBatch):
        cu = mb.cu_seqlens.to(dev)
        # cu_seqlens and max_seqlen describe the whole pack; with context parallelism this rank
        # forwards its chunks of every sequence (megatron's RoPE and attention expect that).
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 cu_seqlens_q_padded=cu, cu_seqlens_kv_padded=cu,
                                 max_seqlen_q=mb.max_seqlen, max_seqlen_kv=mb.max_seqlen)
        positions = mb.position_ids
        cp = _cp_positions(mb)
        if cp is not None:
            tokens, positions = tokens[:, cp.to(dev)], positions[:, cp]
        output = model(tokens, positions.to(dev), None, packed_seq_params=params)
        return output, partial(logits_fn, mb)
    position_ids = torch.arange(mb.seq_length, device=dev).unsqueeze(0).expand_as(tokens)
    # attention_mask=None: causal attention (right padding is never attended by real tokens).
    output = model(tokens, position_ids, None)
    return output, partial(logits_fn, mb)


def run_schedule(model: Sequence[torch.nn.Module], micro_batches: Sequence[MicroBatch],
                 logits_fn: LogitsFn, *, forward_only: bool) -> list[Any]:
    """One megatron forward(-backward) over ``micro_batches``; ``logits_fn(mb, logits)`` gets the
    last stage's raw vocab-parallel logits ``[b, s, V/tp]`` and returns ``(loss, reported)``.

    Returns what ``logits_fn`` reported per micro-batch, in order, on the last pipeline stage
    (an empty list elsewhere).
    """
    if not micro_batches:
        raise PolicyForwardError("no micro-batches to run")
    shapes = {tuple(mb.tokens.shape) for mb in micro_batches}
    # Without pipeline parallelism nothing is sent between stages: packed micro-batches may
    # differ in length (padded rows still share one, as they always have).
    packed = all(isinstance(mb, PackedMicroBatch) for mb in micro_batches)
    if len(shapes) > 1 and (not packed or ps.get_pipeline_model_parallel_world_size() > 1):
        raise PolicyForwardError(f"micro-batches of one schedule must share a shape (pipeline "
                                 f"p2p buffers are fixed), got {sorted(shapes)}")
    mbs, seq = max(shapes, key=lambda sh: sh[1])
    if len(model) == 1:
        data: Any = iter(micro_batches)
        target: Any = model[0]
    else:  # interleaved PP: every virtual stage reads the same micro-batches
        data = [iter(micro_batches) for _ in model]
        target = list(model)
    fb = get_forward_backward_func()
    return fb(forward_step_func=partial(_forward_step, logits_fn), data_iterator=data, model=target,
              num_microbatches=len(micro_batches), seq_length=seq, micro_batch_size=mbs,
              forward_only=forward_only)


def _cp_positions(mb: MicroBatch) -> torch.Tensor | None:
    """This CP rank's positions in a packed micro-batch (None without context parallelism)."""
    cp = ps.get_context_parallel_world_size()
    if cp == 1 or not isinstance(mb, PackedMicroBatch):
        return None
    return shard_positions(mb.cu_seqlens.tolist(), cp, ps.get_context_parallel_rank())


def _labels(mb: MicroBatch, device: torch.device) -> torch.Tensor:
    labels = mb.labels
    cp = _cp_positions(mb)
    if cp is not None:
        labels = labels[:, cp]
    return labels.to(device, non_blocking=True)


def _packed(mb: PackedMicroBatch, values: torch.Tensor) -> torch.Tensor:
    """Per-token values of this rank's tokens → the whole pack's ``[T]`` (gathered over CP:
    every CP rank then computes the same loss, and the backward keeps each rank's own tokens,
    summed over the ranks by the DP x CP gradient reduction)."""
    if ps.get_context_parallel_world_size() == 1:
        return values
    return gather_packed(values.reshape(-1), mb.cu_seqlens.tolist(),
                         ps.get_context_parallel_group(), reduce_grad=False)


def token_logprobs(mb: MicroBatch, logits: torch.Tensor, temperature: float, vocab_size: int
                   ) -> tuple[TrainBatch, torch.Tensor, torch.Tensor]:
    """(rows, log π(label), entropy) of a micro-batch's logits, in the rows' ``[n, S]`` layout."""
    logprobs, entropy = vocab_parallel_logprobs_and_entropy(
        logits, _labels(mb, logits.device), temperature=temperature, vocab_size=vocab_size)
    if isinstance(mb, PackedMicroBatch):
        return mb.rows, mb.unpack(_packed(mb, logprobs)), mb.unpack(_packed(mb, entropy))
    return mb, logprobs, entropy


def _logprob_loss(temperature: float, vocab_size: int, loss_fn: LossFn, mb: MicroBatch,
                  logits: torch.Tensor):
    return loss_fn(*token_logprobs(mb, logits, temperature, vocab_size))


def run_micro_batches(model: Sequence[torch.nn.Module], micro_batches: Sequence[MicroBatch],
                      loss_fn: LossFn, *, forward_only: bool, temperature: float,
                      vocab_size: int) -> list[Any]:
    """One megatron forward(-backward) over ``micro_batches`` (this DP rank's share).

    Returns what ``loss_fn`` reported per micro-batch, in order, on the last pipeline stage
    (an empty list elsewhere). Gradients accumulate in the DDP buffers and are reduced over DP at
    the end (``finalize_model_grads``); the caller zeroes them and steps the optimizer.
    """
    return run_schedule(model, micro_batches, partial(_logprob_loss, temperature, vocab_size, loss_fn),
                        forward_only=forward_only)


def broadcast_from_last_stage(values: torch.Tensor | None, size: int) -> torch.Tensor:
    """A float64 vector ``[size]`` computed on the last pipeline stage (``values``; None on the
    other stages), on every stage, as a CPU tensor."""
    out = torch.zeros(size, dtype=torch.float64, device=current_platform().device())
    if values is not None:
        out.copy_(values.reshape(-1).to(out.device, torch.float64))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(out, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return out.cpu()


@dataclass
class TokenLogprobs:
    """Per-token log π(label) and entropy ``[B, S]`` (0 where ``loss_mask`` is False) and, when
    asked for, ``logit_grad_sq`` ``[B]`` (float64): Σ over the response tokens of
    ‖∂ log π(label) / ∂logits‖² (VCPO's OPOB "logit" gradient norms)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor
    logit_grad_sq: torch.Tensor | None = None


def _collect(temperature: float, vocab_size: int, grad_sq: bool, mb: MicroBatch, logits: torch.Tensor):
    rows_batch, logprobs, entropy = token_logprobs(mb, logits, temperature, vocab_size)
    mask = rows_batch.loss_mask.to(logits.device)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    rows = None
    if grad_sq:  # the same logits, one more pair of vocab reductions: no extra forward
        per_token = vocab_parallel_logit_grad_sq(logits, _labels(mb, logits.device), temperature,
                                                 vocab_size)
        if isinstance(mb, PackedMicroBatch):
            per_token = mb.unpack(_packed(mb, per_token))
        rows = torch.where(mask, per_token.double(), 0.0).sum(dim=-1)
    return (torch.zeros((), device=logprobs.device),
            (torch.where(mask, logprobs, zero).detach(), torch.where(mask, entropy, zero).detach(), rows))


@torch.no_grad()
def compute_logprobs(model: Sequence[torch.nn.Module], batch: TrainBatch, *,
                     micro_batch_size: int, temperature: float, vocab_size: int,
                     logit_grad_sq: bool = False, packing: Sequence[Sequence[int]] | None = None,
                     pack: PackSpec | None = None) -> TokenLogprobs | None:
    """Forward-only log-probs and entropies of ``batch`` (this DP rank's rows) under ``model``
    (and the per-row logit gradient norms with ``logit_grad_sq``).

    ``packing`` (with ``pack``): the rows of each packed micro-batch (indices into ``batch``,
    every row once; ``[]`` an empty micro-batch) instead of ``micro_batch_size`` padded rows;
    the results are in ``batch``'s row order either way.

    Used for the old log-probs at θ(s,0) (the policy) and for a frozen reference policy. Returns
    ``None`` on pipeline stages other than the last, which never need them.
    """
    collect = partial(_collect, float(temperature), int(vocab_size), logit_grad_sq)
    if packing is not None:
        if pack is None:
            raise PolicyForwardError("packed micro-batches need a PackSpec")
        micro = [pack_rows(batch, rows, pack) for rows in packing]
        out = run_schedule(model, micro, collect, forward_only=True)
        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            return None
        dev = out[0][0].device
        res = TokenLogprobs(
            logprobs=torch.zeros(batch.tokens.shape, dtype=torch.float32, device=dev),
            entropy=torch.zeros(batch.tokens.shape, dtype=torch.float32, device=dev),
            logit_grad_sq=torch.zeros(batch.size, dtype=torch.float64) if logit_grad_sq else None)
        for mb, (lp, ent, g) in zip(micro, out):
            if not mb.index:
                continue
            idx = torch.tensor(mb.index, dtype=torch.long, device=dev)
            s = lp.shape[1]
            res.logprobs[idx, :s] = lp.float()
            res.entropy[idx, :s] = ent.float()
            if logit_grad_sq:
                res.logit_grad_sq[idx.cpu()] = g.cpu()
        return res
    out = run_schedule(model, batch.micro_batches(micro_batch_size), collect, forward_only=True)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return TokenLogprobs(logprobs=torch.cat([lp for lp, _, _ in out]).float(),
                         entropy=torch.cat([ent for _, ent, _ in out]).float(),
                         logit_grad_sq=torch.cat([g for _, _, g in out]).cpu() if logit_grad_sq else None)
