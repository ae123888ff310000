"""Plain-PyTorch, single-process reference of SFPO Algorithm 1 (arXiv 2510.04072).

The megatron implementation is checked against this file: same tiny model weights, same batch,
``torch.optim.AdamW`` (betas 0.9/0.999) here vs megatron's optimizer there, parameters compared
after a few SFPO steps. It uses the project's own loss (:mod:`sfpo_megatron.algorithms.losses`) so only the
update schedule is under test.

One rollout batch s (all tensors already on the model's device):

* old log-probs are computed once at θ(s,0) (:func:`compute_old_log_probs`) and are the PPO
  reference of every pass;
* Stage I: K passes (:func:`policy_pass`), each splitting the batch into ``num_mini_batches``
  contiguous mini-batches with one optimizer step per mini-batch;
* Stage II: θ̃ = θ(s,0) + α(θ(s,K) − θ(s,0)) written into the parameters only — AdamW's moments
  and step count are not touched (:func:`reposition_`);
* Stage III: one more pass from θ̃;
* α = 0 skips Stages I and II, so the step is exactly one GRPO pass; the LR scheduler (if any)
  steps once per rollout batch.

Stage II uses ``torch.lerp(θ0, θK, α)``, which is exact at the end points (α = 1 gives θK and
α = 0 gives θ0 bit for bit); the megatron side should use the same expression on its fp32 main
parameters to stay comparable beyond float rounding.

Usage (under pytest ``tests/`` is on ``sys.path``, so ``import reference_sfpo``)::

    from reference_sfpo import RolloutBatch, compute_old_log_probs, sfpo_step
    old = compute_old_log_probs(model, input_ids)
    batch = RolloutBatch(input_ids, response_mask, old, advantages)
    metrics = sfpo_step(model, opt, batch, alpha=0.8, inner_steps=3, num_mini_batches=4,
                        loss_config=PolicyLossConfig(eps_clip=0.2, entropy_coeff=0.001))

Token convention: ``input_ids`` ``[B, S]`` (prompt + response, right-padded); position t of every
``[B, S-1]`` tensor is the prediction of ``input_ids[:, t+1]`` from the prefix ``[:t+1]``;
``response_mask`` marks the response tokens among those targets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from sfpo_megatron.algorithms.losses import PolicyLossConfig, mini_batch_denominators, policy_loss
from sfpo_megatron.trainer.vocab_parallel import logprobs_and_entropy_from_full_logits


@dataclass(frozen=True)
class RolloutBatch:
    input_ids: torch.Tensor  # [B, S] long
    response_mask: torch.Tensor  # [B, S-1]
    old_log_probs: torch.Tensor  # [B, S-1], at θ(s,0)
    advantages: torch.Tensor  # [B] or [B, S-1]
    attention_mask: torch.Tensor | None = None  # [B, S], passed to the model when given
    ref_log_probs: torch.Tensor | None = None  # [B, S-1], only for kl_coeff > 0

    def __post_init__(self) -> None:
        b, s = self.input_ids.shape
        for name in ("response_mask", "old_log_probs"):
            shape = tuple(getattr(self, name).shape)
            if shape != (b, s - 1):
                raise ValueError(f"{name} must be [B={b}, S-1={s - 1}], got {shape}")

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def slice(self, start: int, end: int) -> RolloutBatch:
        def cut(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[start:end]

        return replace(self, input_ids=self.input_ids[start:end],
                       response_mask=self.response_mask[start:end],
                       old_log_probs=self.old_log_probs[start:end],
                       advantages=self.advantages[start:end],
                       attention_mask=cut(self.attention_mask),
                       ref_log_probs=cut(self.ref_log_probs))


def token_log_probs(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each next token, entropy of each next-token distribution), ``[B, S-1]`` each.

    The model maps ``input_ids`` to logits ``[B, S, V]`` (or an object with ``.logits``, as HF).
    """
    out = model(input_ids) if attention_mask is None else model(input_ids, attention_mask=attention_mask)
    logits = out.logits if hasattr(out, "logits") else out
    return logprobs_and_entropy_from_full_logits(logits[:, :-1], input_ids[:, 1:],
                                                 temperature=temperature)


@torch.no_grad()
def compute_old_log_probs(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-probs at the current parameters θ(s,0), without gradient."""
    return token_log_probs(model, input_ids, temperature=temperature,
                           attention_mask=attention_mask)[0]


def policy_pass(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: RolloutBatch,
    *,
    num_mini_batches: int,
    loss_config: PolicyLossConfig,
    temperature: float = 1.0,
    grad_clip: float | None = None,
    loss_scale_factor: float | None = None,
) -> list[dict[str, float]]:
    """One ordinary GRPO/PPO pass over the batch: one optimizer step per mini-batch."""
    if num_mini_batches < 1 or batch.size % num_mini_batches:
        raise ValueError(
            f"batch of {batch.size} sequences does not split into {num_mini_batches} mini-batches")
    per = batch.size // num_mini_batches
    metrics = []
    for i in range(num_mini_batches):
        mb = batch.slice(i * per, (i + 1) * per)
        optimizer.zero_grad(set_to_none=True)
        log_probs, entropy = token_log_probs(model, mb.input_ids, temperature=temperature,
                                             attention_mask=mb.attention_mask)
        denominators = mini_batch_denominators(mb.response_mask, loss_scale_factor)
        loss, m = policy_loss(log_probs, mb.old_log_probs, mb.advantages, mb.response_mask,
                              loss_config, entropy=entropy, ref_log_probs=mb.ref_log_probs,
                              denominators=denominators)
        loss.backward()
        row = {k: float(v) for k, v in m.items()}
        row["loss"] = float(loss.detach())
        if grad_clip is not None:
            row["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
        optimizer.step()
        metrics.append(row)
    optimizer.zero_grad(set_to_none=True)
    return metrics


def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def snapshot_params(model: nn.Module) -> list[torch.Tensor]:
    """θ(s,0): detached copies of the trainable parameters."""
    return [p.detach().clone() for p in trainable_params(model)]


@torch.no_grad()
def reposition_(model: nn.Module, snapshot: list[torch.Tensor], alpha: float) -> None:
    """Stage II in place: θ ← θ0 + α(θ − θ0) (``torch.lerp``); optimizer state untouched."""
    params = trainable_params(model)
    if len(params) != len(snapshot):
        raise ValueError(f"snapshot has {len(snapshot)} tensors, model has {len(params)} params")
    for p, p0 in zip(params, snapshot):
        p.copy_(torch.lerp(p0, p.detach(), alpha))


@torch.no_grad()
def _distance(model: nn.Module, snapshot: list[torch.Tensor]) -> float:
    sq = sum(float((p.detach() - p0).double().square().sum())
             for p, p0 in zip(trainable_params(model), snapshot))
    return sq ** 0.5


def sfpo_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: RolloutBatch,
    *,
    alpha: float,
    inner_steps: int,
    num_mini_batches: int,
    loss_config: PolicyLossConfig,
    temperature: float = 1.0,
    grad_clip: float | None = None,
    loss_scale_factor: float | None = None,
    lr_scheduler: Any | None = None,
    on_pass: Callable[[str, list[dict[str, float]]], None] | None = None,
) -> dict[str, Any]:
    """Algorithm 1 for one rollout batch; returns the logged quantities of the step.

    ``on_pass(stage, metrics)`` is called after every pass (stage ``"fast{k}"`` or ``"slow"``).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if inner_steps < 0:
        raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
    pass_kwargs = dict(num_mini_batches=num_mini_batches, loss_config=loss_config,
                       temperature=temperature, grad_clip=grad_clip,
                       loss_scale_factor=loss_scale_factor)
    out: dict[str, Any] = {"alpha": alpha, "passes": {}}
    if alpha > 0.0:
        theta0 = snapshot_params(model)
        for k in range(inner_steps):  # Stage I
            m = policy_pass(model, optimizer, batch, **pass_kwargs)
            out["passes"][f"fast{k}"] = m
            if on_pass is not None:
                on_pass(f"fast{k}", m)
        out["fast_displacement_norm"] = _distance(model, theta0)
        reposition_(model, theta0, alpha)  # Stage II
        out["reposition_norm"] = _distance(model, theta0)
        del theta0
    m = policy_pass(model, optimizer, batch, **pass_kwargs)  # Stage III (or the GRPO step)
    out["passes"]["slow"] = m
    if on_pass is not None:
        on_pass("slow", m)
    if lr_scheduler is not None:
        lr_scheduler.step()
    return out
