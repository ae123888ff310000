"""Per-trajectory squared policy-gradient norms g2_i for VCPO's off-policy optimal baseline.

VCPO (arXiv 2602.17616) weighs each trajectory of a prompt group by w_i² ‖∇θ log π(τ_i)‖² in
b* = Σ w_i² g2_i R_i / Σ w_i² g2_i (:func:`sfpo_megatron.algorithms.vcpo.opob_baseline`). Here
log π(τ_i) = Σ_t log π_θ(y_t | prefix) over the response tokens of row i (``loss_mask``), at the
rollout temperature, with megatron's padded vocab columns dropped (as the training loss).

Two modes, both collective over every trainer rank (same arguments everywhere) and both
returning, on every rank (every TP rank and PP stage), a float64 CPU tensor ``[B_local]`` for
this DP rank's rows in order:

* :func:`trajectory_grad_sq_norms` ("exact"): ‖∇θ log π(τ_i)‖² over all trainable parameters,
  from one backward per row into megatron DDP's ``main_grad`` buffers. Cost: about one
  forward + backward over the batch at micro-batch size 1 (rows are cut to their last response
  token, so usually less), one schedule call per row, plus one small all-reduce at the end.
* :func:`logit_grad_sq_norms` ("logit"): ‖∂ log π(τ_i) / ∂z‖² over the logits z of the response
  positions, = Σ_t ((1 − p_t(y_t))² + Σ_{v≠y_t} p_t(v)²) / T². Forward only, at the training
  micro-batch size: the cost of one log-prob pass. A cheap proxy for the exact norm (the
  last-layer part of the chain rule only).

How the exact mode reads per-row gradients from megatron (0.16.1):

* the schedule's ``finalize_model_grads`` is switched off for the call: it would all-reduce the
  grads over DP (each DP rank's rows are different trajectories) and apply DDP's
  ``gradient_scaling_factor`` (1/dp, applied inside ``start_grad_sync`` only). Its model-parallel
  parts are kept and run after each row: the tied-embedding all-reduce between the first and last
  PP stage, and the TP sum of grads megatron treats as partial (sequence-parallel norms,
  q/k layernorm);
* each row's schedule call runs inside the DDP chunks' ``no_sync`` (entered per row, since
  ``zero_grad_buffer()`` resets the bucket groups to "sync"), and the schedule's own
  ``no_sync_func`` and ``grad_sync_func`` are switched off (leaving the schedule's no-sync
  context re-enables sync): with ``--overlap-grad-reduce`` the backward hooks would otherwise
  start the DP reduce of a bucket as soon as it is complete;
* the loss is Σ_t log π; the schedule divides it by ``num_microbatches`` (1 here) and multiplies
  it by the optimizer's loss scale (``config.grad_scale_func``; 1 for fp32 / bf16, the dynamic
  scale with fp16), so the squared norm is divided by the loss scale²;
* squares are summed over params that are neither TP duplicates nor the last stage's copy of the
  tied embedding (megatron's grad-norm rule), then all-reduced over the model-parallel group.

Grads are zeroed before the first row and after every row, so they are zero on exit (any
gradients accumulated before the call are discarded); parameters and optimizer state are not
touched. With interleaved (virtual) PP the schedule needs at least PP micro-batches per call, so
each row is padded with PP − 1 zero-weight copies of itself (PP times the compute).
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from sfpo_megatron.distributed.platform import current_platform
from sfpo_megatron.errors import UserError
from sfpo_megatron.trainer.main_params import finish_param_gather
from sfpo_megatron.trainer.model_setup import zero_grads
from sfpo_megatron.trainer.policy_forward import broadcast_from_last_stage, compute_logprobs, run_schedule
from sfpo_megatron.trainer.train_batch import TrainBatch
from sfpo_megatron.trainer.vocab_parallel import vocab_parallel_logprobs_and_entropy

# Rows are cut to their last response token, rounded up to this multiple (x TP size, which
# sequence parallelism needs), so the shapes the schedule sees stay few and aligned.
_SEQ_MULTIPLE = 8


class TrajectoryGradNormError(UserError):
    """Settings or a batch the per-trajectory gradient norms cannot be computed for."""


def _check_args(batch: TrainBatch, temperature: float, vocab_size: int) -> None:
    if not temperature > 0:
        raise TrajectoryGradNormError(f"temperature must be > 0, got {temperature}")
    if vocab_size < 1:
        raise TrajectoryGradNormError(f"vocab_size must be >= 1, got {vocab_size}")
    if batch.size < 1:
        raise TrajectoryGradNormError("the batch has no rows")


# ---------------------------------------------------------------------------------------------
# "logit" mode
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def logit_grad_sq_norms(model: Sequence[torch.nn.Module], batch: TrainBatch, *,
                        micro_batch_size: int, temperature: float,
                        vocab_size: int) -> torch.Tensor:
    """‖∂ Σ_t log π(y_t) / ∂z‖² per row of ``batch`` (this DP rank's rows), z the logits of the
    response positions: Σ_t ((1 − p_t(y_t))² + Σ_{v≠y_t} p_t(v)²) / T², p = softmax(z / T) over
    the real vocab. One forward-only pass at ``micro_batch_size`` (no backward); the vocab stays
    split over TP. Float64 CPU ``[B_local]`` on every rank. (The policy update gets the same
    values from its old-log-prob forward, ``compute_logprobs(..., logit_grad_sq=True)``.)"""
    _check_args(batch, temperature, vocab_size)
    res = compute_logprobs(model, batch, micro_batch_size=micro_batch_size, temperature=temperature,
                           vocab_size=vocab_size, logit_grad_sq=True)
    return broadcast_from_last_stage(None if res is None else res.logit_grad_sq, batch.size)


# ---------------------------------------------------------------------------------------------
# "exact" mode
# ---------------------------------------------------------------------------------------------


def _sum_logprobs(temperature: float, vocab_size: int, weight: float, mb: TrainBatch,
                  logits: torch.Tensor):
    labels = mb.labels.to(logits.device, non_blocking=True)
    mask = mb.loss_mask.to(logits.device, non_blocking=True)
    logprobs, _ = vocab_parallel_logprobs_and_entropy(
        logits, labels, temperature=temperature, vocab_size=vocab_size)
    loss = torch.where(mask, logprobs, 0.0).sum()
    return loss * weight, loss.detach()


def _row_length(mask: torch.Tensor, seq_length: int, multiple: int) -> int:
    """Tokens row needs: up to its last response label position, rounded up to ``multiple``."""
    last = int(mask.nonzero().max()) + 1
    return min(seq_length, math.ceil(last / multiple) * multiple)


def _model_parallel_grad_reductions(model: Sequence[torch.nn.Module], config) -> None:
    """finalize_model_grads without the DP part: what makes each main_grad the full gradient of
    its parameter within this DP replica (megatron's own helpers, same groups)."""
    # The module, not the function megatron.core.distributed re-exports under the same name.
    fmg = importlib.import_module("megatron.core.distributed.finalize_model_grads")

    model = list(model)
    pp_group = ps.get_pipeline_model_parallel_group()
    fmg._allreduce_conditional_embedding_grads(model, config, pp_group)
    fmg._allreduce_non_tensor_model_parallel_grads(
        model, config, ps.get_tensor_model_parallel_group())
    fmg._allreduce_word_embedding_grads(
        model, config, ps.get_embedding_group(check_initialized=False), pp_group)
    fmg._allreduce_position_embedding_grads(
        model, config, ps.get_position_embedding_group(check_initialized=False), pp_group)


def _counted_params(model: Sequence[torch.nn.Module]) -> list[torch.nn.Parameter]:
    """Trainable params in megatron's grad norm: no TP duplicates, no PP copy of tied weights."""
    tp_group = ps.get_tensor_model_parallel_group()
    out = []
    for chunk in model:
        for p in chunk.parameters():
            if not p.requires_grad:
                continue
            if not hasattr(p, "main_grad"):
                raise TrajectoryGradNormError(
                    "exact trajectory grad norms need megatron DDP-wrapped chunks "
                    "(param.main_grad)")
            if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p, tp_group):
                out.append(p)
    return out


def _loss_scale(optimizer) -> float:
    scale = optimizer.get_loss_scale()
    return float(scale.item() if torch.is_tensor(scale) else scale)


def trajectory_grad_sq_norms(setup, batch: TrainBatch, *, temperature: float,
                             vocab_size: int) -> torch.Tensor:
    """‖∇θ Σ_t log π_θ(y_t | prefix)‖² over all trainable parameters, per row of ``batch``
    (this DP rank's rows), as float64 CPU ``[B_local]`` on every rank.

    ``setup``: the trainer's ``TrainingSetup`` (DDP chunks, optimizer, config). Cost: about one
    forward + backward over the batch at micro-batch size 1 (each row cut to its last response
    token), one schedule call per row (PP times that with interleaved PP, see the module doc).
    Rows without response tokens get 0 without a pass. Grads are zero on return, parameters
    and optimizer state untouched; the model config is restored even on error.
    """
    _check_args(batch, temperature, vocab_size)
    if ps.get_context_parallel_world_size() > 1:
        raise TrajectoryGradNormError("context parallelism is not supported by the "
                                      "per-trajectory gradient norms")
    model, config = list(setup.model), setup.config
    params = _counted_params(model)
    # Interleaved PP needs >= PP micro-batches per schedule call: pad with zero-weight copies.
    copies = ps.get_pipeline_model_parallel_world_size() if len(model) > 1 else 1
    multiple = _SEQ_MULTIPLE * ps.get_tensor_model_parallel_world_size()
    loss_scale = _loss_scale(setup.optimizer)
    step = partial(_sum_logprobs, float(temperature), int(vocab_size))
    local = torch.zeros(batch.size, dtype=torch.float64, device=current_platform().device())

    # With --overlap-param-gather the first forward would all-gather params over DP; do it now,
    # on every DP rank at once, since DP ranks may run different numbers of rows below.
    finish_param_gather(setup.optimizer)
    saved = (config.finalize_model_grads_func, config.no_sync_func, config.grad_sync_func)
    config.finalize_model_grads_func = config.no_sync_func = config.grad_sync_func = None
    try:
        zero_grads(setup)
        for i in range(batch.size):
            row = batch.slice(i, i + 1)
            if not bool(row.loss_mask.any()):
                continue
            cut = _row_length(row.loss_mask[0], row.seq_length, multiple)
            row = TrainBatch(tokens=row.tokens[:, :cut], labels=row.labels[:, :cut],
                             loss_mask=row.loss_mask[:, :cut], advantages=row.advantages,
                             rollout_logprobs=row.rollout_logprobs[:, :cut],
                             group_ids=row.group_ids, weight_versions=row.weight_versions)
            # Entered per row: zero_grad_buffer() re-enables grad sync (bucket group reset).
            with contextlib.ExitStack() as no_sync:
                for chunk in model:
                    no_sync.enter_context(chunk.no_sync())
                run_schedule(model, [row] * copies, _PaddedLoss(step, copies), forward_only=False)
            _model_parallel_grad_reductions(model, config)
            with torch.no_grad():
                sq = torch.zeros((), dtype=torch.float64, device=local.device)
                for p in params:
                    sq += torch.linalg.vector_norm(p.main_grad, dtype=torch.float64).square()
                local[i] = sq
            zero_grads(setup)
    finally:
        config.finalize_model_grads_func, config.no_sync_func, config.grad_sync_func = saved
        zero_grads(setup)
    mp_group = ps.get_model_parallel_group()
    if dist.get_world_size(mp_group) > 1:
        dist.all_reduce(local, group=mp_group)
    return (local / (loss_scale * loss_scale)).cpu()


class _PaddedLoss:
    """Weight 1 for the first micro-batch of a call, 0 for the padding copies after it; the
    schedule divides every loss by the micro-batch count, so the first one is scaled back up."""

    def __init__(self, step, copies: int) -> None:
        self.step, self.copies, self.seen = step, copies, 0

    def __call__(self, mb: TrainBatch, logits: torch.Tensor):
        weight = float(self.copies) if self.seen % self.copies == 0 else 0.0
        self.seen += 1
        return self.step(weight, mb, logits)
