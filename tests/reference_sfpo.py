"""Plain-PyTorch, single-process reference of the SFPO / GRPO update (SFPO = arXiv 2510.04072,
Algorithm 1), written from the papers' and verl's definitions. It imports nothing from
``sfpo_megatron``: the samples' collation, the log-probs, the PPO loss, the optimizer loop and the
reposition are all its own, so an error in the project's version of any of them shows up as a
difference instead of being shared. The megatron implementation is checked against it
(tests/test_sfpo_update.py: same tiny HF model weights, same batch, ``torch.optim.AdamW`` here vs
megatron's optimizer there).

One rollout batch s:

* old log-probs once at θ(s,0) (:func:`with_log_probs`), the PPO reference of every pass;
* SFPO (:func:`sfpo_step`): Stage I: K passes (:func:`policy_pass`), each splitting the batch into
  ``num_mini_batches`` contiguous mini-batches with one optimizer step per mini-batch; Stage II:
  θ̃ = θ(s,0) + α(θ(s,K) − θ(s,0)) written into the parameters only — the optimizer's moments and
  step count are not touched (:func:`reposition_`); Stage III: one more pass from θ̃. α = 0 skips
  Stages I and II (one GRPO pass);
* GRPO with E PPO epochs (:func:`grpo_step`): E passes against the same old log-probs;
* the LR scheduler (if any) steps once per rollout batch.

Stage II uses ``torch.lerp(θ0, θK, α)``, exact at the end points (α = 1 gives θK, α = 0 gives θ0
bit for bit).

Token convention: ``tokens`` ``[B, S]`` (prompt + response, right-padded with ``pad_id``);
position t of every ``[B, S-1]`` tensor is the prediction of ``tokens[:, t+1]`` from
``tokens[:, :t+1]``; ``response_mask`` marks the response tokens among those targets (response
token j of a sample with a prompt of p tokens sits at position p − 1 + j).

Usage (under pytest ``tests/`` is on ``sys.path``)::

    from reference_sfpo import LossConfig, collate, sfpo_step, with_log_probs
    batch = with_log_probs(collate(samples), model, temperature=0.8)
    out = sfpo_step(model, opt, batch, alpha=0.8, inner_steps=3, num_mini_batches=4,
                    loss_config=LossConfig(eps_clip=0.2, entropy_coeff=0.001))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "low_var_kl")  # low_var_kl is Schulman's k3 estimator
LOG_RATIO_CLAMP = 20.0  # verl clamps log(π/π_old) to ±20 before exp()


# ---- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutBatch:
    tokens: torch.Tensor  # [B, S] long
    response_mask: torch.Tensor  # [B, S-1] bool
    advantages: torch.Tensor  # [B], one per response
    old_log_probs: torch.Tensor | None = None  # [B, S-1] at θ(s,0)
    ref_log_probs: torch.Tensor | None = None  # [B, S-1] of the frozen reference policy (KL)

    def __post_init__(self) -> None:
        b, s = self.tokens.shape
        for name in ("response_mask", "old_log_probs", "ref_log_probs"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (b, s - 1):
                raise ValueError(f"{name} must be [B={b}, S-1={s - 1}], got {tuple(t.shape)}")
        if tuple(self.advantages.shape) != (b,):
            raise ValueError(f"advantages must be [B={b}], got {tuple(self.advantages.shape)}")

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def rows(self, start: int, end: int) -> RolloutBatch:
        def cut(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[start:end]

        return RolloutBatch(self.tokens[start:end], self.response_mask[start:end],
                            self.advantages[start:end], cut(self.old_log_probs),
                            cut(self.ref_log_probs))


def collate(samples: Sequence[Any], pad_id: int = 0) -> RolloutBatch:
    """Samples (objects with ``prompt_ids``, ``response_ids``, ``advantage``) → right-padded
    tensors; S is the longest prompt + response."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    s_len = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    tokens = torch.full((len(samples), s_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), s_len - 1), dtype=torch.bool)
    for i, s in enumerate(samples):
        if not s.prompt_ids:
            raise ValueError(f"sample {i} has an empty prompt")
        ids = list(s.prompt_ids) + list(s.response_ids)
        tokens[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        p = len(s.prompt_ids)
        mask[i, p - 1:p - 1 + len(s.response_ids)] = True
    adv = torch.tensor([float(s.advantage) for s in samples], dtype=torch.float32)
    return RolloutBatch(tokens, mask, adv)


def response_values(values: torch.Tensor, samples: Sequence[Any]) -> torch.Tensor:
    """The response positions of a per-position tensor (this module's ``[B, S-1]`` or any
    ``[B, S']`` with the same alignment, e.g. megatron's labels-aligned ``[B, S]``), sample by
    sample, as one flat tensor."""
    parts = []
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        parts.append(values[i, p - 1:p - 1 + r])
    return torch.cat(parts)


def group_advantages(rewards: Sequence[float], group_ids: Sequence[Any],
                     eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (r − mean of the group) / (unbiased std of the group + eps); a group whose rewards
    all agree (one sample included) gets 0."""
    r = torch.tensor([float(x) for x in rewards], dtype=torch.float64)
    out = torch.zeros_like(r)
    for g in dict.fromkeys(group_ids):
        idx = torch.tensor([i for i, x in enumerate(group_ids) if x == g])
        rg = r[idx]
        if len(idx) > 1 and bool((rg != rg[0]).any()):
            out[idx] = (rg - rg.mean()) / (rg.std(unbiased=True) + eps)
    return out


# ---- log-probs ----------------------------------------------------------------------------------


def token_log_probs(model: nn.Module, tokens: torch.Tensor,
                    temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(tokens[:, t+1] | tokens[:, :t+1]), entropy of that next-token distribution), both
    ``[B, S-1]``, of the policy ``softmax(logits / temperature)`` (in fp32, or fp64 for fp64
    logits). ``model(tokens)`` gives the logits ``[B, S, V]`` (or an object with ``.logits``, as HF
    causal LMs)."""
    out = model(tokens)
    logits = out.logits if hasattr(out, "logits") else out
    logits = logits[:, :-1]
    scaled = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    log_p = scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)
    chosen = torch.gather(log_p, 2, tokens[:, 1:].unsqueeze(2)).squeeze(2)
    entropy = -(torch.softmax(scaled, dim=-1) * log_p).sum(dim=-1)
    return chosen, entropy


@torch.no_grad()
def with_log_probs(batch: RolloutBatch, model: nn.Module, temperature: float = 1.0,
                   ref_model: nn.Module | None = None) -> RolloutBatch:
    """The batch with its old log-probs at the model's current parameters θ(s,0) (and the
    reference policy's, when ``ref_model`` is given), without gradient."""
    old = token_log_probs(model, batch.tokens, temperature)[0]
    ref = None if ref_model is None else token_log_probs(ref_model, batch.tokens, temperature)[0]
    return replace(batch, old_log_probs=old, ref_log_probs=ref)


# ---- loss ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossConfig:
    eps_clip: float | None = 0.2  # None: no PPO clip (ratio · A)
    eps_clip_high: float | None = None  # upper clip range; None: eps_clip
    dual_clip_c: float | None = None  # for A < 0 the objective is at least c · A
    agg_mode: str = "token-mean"
    entropy_coeff: float = 0.0
    kl_coeff: float = 0.0
    kl_type: str = "low_var_kl"

    def __post_init__(self) -> None:
        if self.agg_mode not in AGG_MODES:
            raise ValueError(f"agg_mode must be one of {AGG_MODES}, got {self.agg_mode!r}")
        if self.kl_type not in KL_TYPES:
            raise ValueError(f"kl_type must be one of {KL_TYPES}, got {self.kl_type!r}")


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str,
              loss_scale_factor: float | None = None) -> torch.Tensor:
    """One number from per-token values ``[B, T]`` over the whole (mini-)batch given:
    token-mean = mean over all response tokens; seq-mean-token-mean = mean over the sequences
    (with a response token) of each one's token mean; seq-mean-token-sum-norm = sum over all
    tokens / (sequences · L), L = ``loss_scale_factor`` (default T)."""
    mask = mask.bool()
    x = torch.where(mask, values, torch.zeros((), dtype=values.dtype))
    per_seq_tokens = mask.sum(dim=1)
    seqs = int((per_seq_tokens > 0).sum())
    if mode == "token-mean":
        return x.sum() / max(int(mask.sum()), 1)
    if mode == "seq-mean-token-mean":
        seq_means = x.sum(dim=1) / per_seq_tokens.clamp(min=1)
        return seq_means.sum() / max(seqs, 1)
    if mode == "seq-mean-token-sum-norm":
        scale = mask.shape[1] if loss_scale_factor is None else loss_scale_factor
        return x.sum() / (max(seqs, 1) * scale)
    raise ValueError(f"unknown aggregation mode {mode!r}")


def kl_estimate(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from the sampled token's log-probs: k1 = log π − log
    π_ref; low_var_kl (k3) = π_ref/π − log(π_ref/π) − 1 with log(π_ref/π) clamped to ±20 and the
    result to [−10, 10] (as verl)."""
    if kl_type == "k1":
        return log_probs - ref_log_probs
    d = (ref_log_probs - log_probs).clamp(-20.0, 20.0)
    return (torch.exp(d) - d - 1.0).clamp(-10.0, 10.0)


def ppo_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
             mask: torch.Tensor, config: LossConfig, *, entropy: torch.Tensor | None = None,
             ref_log_probs: torch.Tensor | None = None,
             loss_scale_factor: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one whole mini-batch, and its metrics.

    With r = π/π_old per token and A the sequence's advantage, the PPO objective is
    min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A), with the dual clip max(that, c·A) for A < 0; the
    loss is −agg(objective) − entropy_coeff·agg(entropy) + kl_coeff·agg(KL estimate).
    """
    mask = mask.bool()
    adv = advantages.to(log_probs.dtype).unsqueeze(1).expand_as(log_probs)
    log_ratio = (log_probs - old_log_probs.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    objective = ratio * adv
    clipped = torch.zeros_like(mask)
    dual = torch.zeros_like(mask)
    if config.eps_clip is not None:
        high = config.eps_clip if config.eps_clip_high is None else config.eps_clip_high
        clipped_obj = torch.clamp(ratio, 1.0 - config.eps_clip, 1.0 + high) * adv
        clipped = clipped_obj < objective
        objective = torch.minimum(objective, clipped_obj)
        if config.dual_clip_c is not None:
            floor = config.dual_clip_c * adv
            dual = (adv < 0) & (objective < floor)
            objective = torch.where(adv < 0, torch.maximum(objective, floor), objective)
    loss = -aggregate(objective, mask, config.agg_mode, loss_scale_factor)
    n = max(int(mask.sum()), 1)

    def token_mean(x: torch.Tensor) -> float:
        return float(torch.where(mask, x.detach().double(), torch.zeros((), dtype=torch.float64))
                     .sum()) / n

    metrics = {"pg_loss": float(loss.detach()), "pg_clipfrac": token_mean(clipped.double()),
               "pg_clipfrac_lower": token_mean(dual.double()), "ppo_kl": token_mean(-log_ratio),
               "num_tokens": float(mask.sum())}
    if entropy is not None:
        metrics["entropy"] = token_mean(entropy)
        # Per sequence (sum over its response tokens, count): for the entropy series that
        # depend on how the mini-batch is split.
        per_seq = torch.where(mask, entropy.detach().double(), torch.zeros((), dtype=torch.float64))
        metrics["seq_entropy_sums"] = per_seq.sum(dim=1).tolist()
        metrics["seq_tokens"] = mask.sum(dim=1).tolist()
        if config.entropy_coeff:
            loss = loss - config.entropy_coeff * aggregate(entropy, mask, config.agg_mode,
                                                           loss_scale_factor)
    if config.kl_coeff:
        if ref_log_probs is None:
            raise ValueError("kl_coeff > 0 needs the reference policy's log-probs")
        kl = kl_estimate(log_probs, ref_log_probs.detach(), config.kl_type)
        metrics["kl"] = token_mean(kl)
        loss = loss + config.kl_coeff * aggregate(kl, mask, config.agg_mode, loss_scale_factor)
    return loss, metrics


# ---- the update ---------------------------------------------------------------------------------


def policy_pass(model: nn.Module, optimizer: torch.optim.Optimizer, batch: RolloutBatch, *,
                num_mini_batches: int, loss_config: LossConfig, temperature: float = 1.0,
                grad_clip: float | None = None,
                loss_scale_factor: float | None = None) -> list[dict[str, float]]:
    """One GRPO/PPO pass over the batch: one optimizer step per contiguous mini-batch."""
    if batch.old_log_probs is None:
        raise ValueError("the batch has no old log-probs: with_log_probs(batch, model) first")
    if num_mini_batches < 1 or batch.size % num_mini_batches:
        raise ValueError(
            f"batch of {batch.size} sequences does not split into {num_mini_batches} mini-batches")
    per = batch.size // num_mini_batches
    rows = []
    for i in range(num_mini_batches):
        mb = batch.rows(i * per, (i + 1) * per)
        optimizer.zero_grad(set_to_none=True)
        log_probs, entropy = token_log_probs(model, mb.tokens, temperature)
        loss, row = ppo_loss(log_probs, mb.old_log_probs, mb.advantages, mb.response_mask,
                             loss_config, entropy=entropy, ref_log_probs=mb.ref_log_probs,
                             loss_scale_factor=loss_scale_factor)
        loss.backward()
        row["loss"] = float(loss.detach())
        if grad_clip is not None:
            params = [p for p in model.parameters() if p.grad is not None]
            row["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
        optimizer.step()
        rows.append(row)
    optimizer.zero_grad(set_to_none=True)
    return rows


def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def reposition_(params: Sequence[torch.Tensor], theta0: Sequence[torch.Tensor],
                alpha: float) -> None:
    """Stage II in place: θ ← θ0 + α(θ − θ0), as ``torch.lerp``; nothing else is touched."""
    if len(params) != len(theta0):
        raise ValueError(f"snapshot has {len(theta0)} tensors, the model {len(params)} params")
    for p, p0 in zip(params, theta0):
        p.copy_(torch.lerp(p0, p, alpha))


@torch.no_grad()
def distance(params: Sequence[torch.Tensor], theta0: Sequence[torch.Tensor]) -> float:
    """‖θ − θ0‖ over all parameters (float64 sum)."""
    return sum(float((p - p0).double().square().sum()) for p, p0 in zip(params, theta0)) ** 0.5


def sfpo_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: RolloutBatch, *,
              alpha: float, inner_steps: int, num_mini_batches: int, loss_config: LossConfig,
              temperature: float = 1.0, grad_clip: float | None = None,
              loss_scale_factor: float | None = None, lr_scheduler: Any | None = None,
              on_pass: Callable[[str, list[dict[str, float]]], None] | None = None,
              slow_pass: bool = True) -> dict[str, Any]:
    """Algorithm 1 for one rollout batch (old log-probs already in ``batch``); returns the logged
    quantities. ``on_pass(name, rows)`` is called after every pass (``fast{k}``, ``slow``).
    ``slow_pass=False``: the paper's "w/o Stage III" ablation, the step ends at θ̃ (with α = 0
    the step is still its one GRPO pass)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if inner_steps < 0:
        raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
    kw = dict(num_mini_batches=num_mini_batches, loss_config=loss_config,
              temperature=temperature, grad_clip=grad_clip, loss_scale_factor=loss_scale_factor)
    out: dict[str, Any] = {"alpha": alpha, "passes": {}}

    def run(name: str) -> None:
        rows = policy_pass(model, optimizer, batch, **kw)
        out["passes"][name] = rows
        if on_pass is not None:
            on_pass(name, rows)

    if alpha > 0.0:
        params = trainable_params(model)
        theta0 = [p.detach().clone() for p in params]
        for k in range(inner_steps):  # Stage I
            run(f"fast{k}")
        out["fast_displacement_norm"] = distance(params, theta0)
        reposition_(params, theta0, alpha)  # Stage II
        out["reposition_norm"] = distance(params, theta0)
        del theta0
    if slow_pass or alpha == 0.0:
        run("slow")  # Stage III (or the GRPO pass)
    if lr_scheduler is not None:
        lr_scheduler.step()
    return out


def grpo_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: RolloutBatch, *,
              epochs: int, num_mini_batches: int, loss_config: LossConfig,
              temperature: float = 1.0, grad_clip: float | None = None,
              loss_scale_factor: float | None = None,
              lr_scheduler: Any | None = None) -> dict[str, Any]:
    """GRPO with ``epochs`` PPO epochs: that many passes, all against the old log-probs in
    ``batch``; passes named ``slow`` (one epoch) or ``epoch0`` … (several)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    names = ["slow"] if epochs == 1 else [f"epoch{e}" for e in range(epochs)]
    out: dict[str, Any] = {"alpha": 0.0, "passes": {}}
    for name in names:
        out["passes"][name] = policy_pass(
            model, optimizer, batch, num_mini_batches=num_mini_batches, loss_config=loss_config,
            temperature=temperature, grad_clip=grad_clip, loss_scale_factor=loss_scale_factor)
    if lr_scheduler is not None:
        lr_scheduler.step()
    return out
