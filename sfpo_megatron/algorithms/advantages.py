"""Group-normalized (GRPO / Dr.GRPO) advantages, one scalar per response, broadcast per token.

Convention (matches verl's ``compute_grpo_outcome_advantage``, volcengine/verl
``verl/trainer/ppo/core_algos.py``): within each prompt group

    A_i = (r_i - mean(r)) / (std(r) + eps)        (GRPO, default eps = 1e-6)
    A_i =  r_i - mean(r)                           (Dr.GRPO, ``std_normalize=False``,
                                                    i.e. ``--disable-std-normalization``)

where ``std`` is ``torch.std`` with its default *unbiased* (Bessel, n-1) estimator, exactly as verl.

Two deliberate differences from verl, both about degenerate groups:
* a group whose rewards are all equal gets advantage exactly 0. verl computes
  ``(r - mean) / (0 + eps)``, and ``mean`` of equal floats is not always bit-equal to them
  (e.g. three rewards of 0.1), so verl can emit ~1e-9/1e-6 = O(1e-3) noise instead of 0;
* a single-response group (n = 1) is such a group, so it also gets 0. verl falls back to
  mean 0 / std 1 there and returns the raw reward, which is not a relative advantage.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from sfpo_megatron.errors import UserError


class AdvantageInputError(UserError):
    """Rewards / group ids / masks with the wrong shape or content."""


def _as_float_tensor(rewards: torch.Tensor | Sequence[float]) -> torch.Tensor:
    t = torch.as_tensor(rewards)
    if not torch.is_floating_point(t):
        t = t.to(torch.float32)
    if not torch.isfinite(t).all():
        raise AdvantageInputError(f"rewards must be finite, got {t.tolist()}")
    return t


def _group_index(group_ids: torch.Tensor | Sequence[Hashable], n: int) -> tuple[torch.Tensor, int]:
    """Maps arbitrary group ids (ints, strings, uuids) to 0..G-1 in order of first appearance."""
    if isinstance(group_ids, torch.Tensor):
        group_ids = group_ids.tolist()
    ids = list(group_ids)
    if len(ids) != n:
        raise AdvantageInputError(f"group_ids has {len(ids)} entries but rewards has {n}")
    mapping: dict[Hashable, int] = {}
    index = [mapping.setdefault(g, len(mapping)) for g in ids]
    return torch.tensor(index, dtype=torch.long), len(mapping)


def _normalize_one_group(r: torch.Tensor, eps: float, std_normalize: bool) -> torch.Tensor:
    if r.numel() == 1 or bool((r == r[0]).all()):
        return torch.zeros_like(r)
    centered = r - torch.mean(r)
    if not std_normalize:
        return centered
    return centered / (torch.std(r) + eps)


def group_std(rewards: torch.Tensor, group_index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Per-sample unbiased std of its group's rewards (0 for a single-sample group)."""
    out = torch.zeros_like(rewards)
    for g in range(num_groups):
        sel = group_index == g
        r = rewards[sel]
        out[sel] = torch.std(r) if r.numel() > 1 else 0.0
    return out


def group_normalized_advantages(
    rewards: torch.Tensor | Sequence[float],
    group_ids: torch.Tensor | Sequence[Hashable] | None = None,
    *,
    eps: float = 1e-6,
    std_normalize: bool = True,
) -> torch.Tensor:

    """Per-response advantages, same shape as ``rewards``.

    ``rewards`` is either ``[num_prompts, n]`` (each row one prompt group; ``group_ids`` must be
    None) or flat ``[B]`` with ``group_ids`` of length B (any hashable ids; samples of a group need
    not be contiguous). Integer rewards are promoted to float32; float64 stays float64.
    """
    r = _as_float_tensor(rewards)
    if eps < 0:
        raise AdvantageInputError(f"eps must be >= 0, got {eps}")
    if r.dim() == 2:
        if group_ids is not None:
            raise AdvantageInputError(
                f"rewards of shape {tuple(r.shape)} are already grouped by row; pass group_ids only "
                "with flat [B] rewards")
        if r.shape[0] == 0 or r.shape[1] == 0:
            raise AdvantageInputError(f"rewards of shape {tuple(r.shape)} has an empty group")
        return torch.stack([_normalize_one_group(row, eps, std_normalize) for row in r])
    if r.dim() != 1:
        raise AdvantageInputError(
            f"rewards must be [num_prompts, n] or flat [B], got shape {tuple(r.shape)}")
    if group_ids is None:
        raise AdvantageInputError("flat [B] rewards need group_ids (the prompt of each response)")
    index, num_groups = _group_index(group_ids, r.numel())
    out = torch.empty_like(r)
    for g in range(num_groups):
        sel = index == g
        out[sel] = _normalize_one_group(r[sel], eps, std_normalize)
    return out


def broadcast_to_tokens(seq_values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` (or ``[P, n]``) per-response values → ``[B, T]`` per-token, 0 on masked tokens."""
    v = seq_values.reshape(-1)
    if response_mask.dim() != 2 or response_mask.shape[0] != v.numel():
        raise AdvantageInputError(
            f"response_mask must be [B={v.numel()}, T], got shape {tuple(response_mask.shape)}")
    mask = response_mask.to(torch.bool)
    return torch.where(mask, v.unsqueeze(-1), torch.zeros((), dtype=v.dtype, device=v.device))
