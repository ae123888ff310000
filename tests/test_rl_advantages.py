"""Group-normalized advantages against hand-computed values and verl's loop."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

from sfpo_megatron.algorithms.advantages import (
    AdvantageInputError,
    broadcast_to_tokens,
    group_normalized_advantages,
)


def verl_grpo(scores: torch.Tensor, index: list, eps: float = 1e-6, norm: bool = True) -> torch.Tensor:
    """verl's compute_grpo_outcome_advantage (the per-sample loop), for groups of size > 1."""
    id2score = defaultdict(list)
    for i in range(len(scores)):
        id2score[index[i]].append(scores[i])
    id2mean = {k: torch.mean(torch.stack(v)) for k, v in id2score.items()}
    id2std = {k: torch.std(torch.stack(v)) for k, v in id2score.items()}
    out = scores.clone()
    for i in range(len(scores)):
        if norm:
            out[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + eps)
        else:
            out[i] = scores[i] - id2mean[index[i]]
    return out


def test_hand_computed_grpo_and_dr_grpo():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    adv = group_normalized_advantages(rewards)
    # Row 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3).
    s0 = math.sqrt(1.0 / 3.0)
    # Row 1: mean 0.25, unbiased std sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5.
    expected = torch.tensor([[0.5 / (s0 + 1e-6), -0.5 / (s0 + 1e-6), -0.5 / (s0 + 1e-6), 0.5 / (s0 + 1e-6)],
                             [0.75 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001]])
    torch.testing.assert_close(adv, expected, rtol=1e-6, atol=1e-7)
    dr = group_normalized_advantages(rewards, std_normalize=False)
    assert dr.tolist() == [[0.5, -0.5, -0.5, 0.5], [0.75, -0.25, -0.25, -0.25]]


def test_equal_rewards_give_exact_zero_where_verl_does_not():
    rewards = torch.tensor([[0.9, 0.9, 0.9], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    adv = group_normalized_advantages(rewards)
    assert torch.equal(adv, torch.zeros(3, 3))
    # In fp32 mean(0.9, 0.9, 0.9) != 0.9; verl divides that residue (6e-8) by eps = 1e-6.
    residue = verl_grpo(torch.tensor([0.9, 0.9, 0.9]), [0, 0, 0])
    assert residue.abs().max() > 0.01


def test_single_response_group_is_zero():
    adv = group_normalized_advantages(torch.tensor([3.0, 1.0, 2.0]), ["a", "b", "b"])
    assert adv[0].item() == 0.0
    assert adv[1].item() == pytest.approx(-0.5 / (math.sqrt(0.5) + 1e-6))


def test_flat_with_interleaved_string_ids_matches_rows_and_verl():
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 3, (5, 8), generator=g).float() / 2
    ids = [f"prompt-{p}" for p in range(5) for _ in range(8)]
    perm = torch.randperm(40, generator=g)
    flat = rows.reshape(-1)[perm]
    flat_ids = [ids[i] for i in perm.tolist()]
    adv_flat = group_normalized_advantages(flat, flat_ids)
    adv_rows = group_normalized_advantages(rows).reshape(-1)[perm]
    torch.testing.assert_close(adv_flat, adv_rows, rtol=0, atol=1e-6)
    ref = verl_grpo(flat, flat_ids)
    nondegenerate = torch.tensor([len(set(rows[int(i) // 8].tolist())) > 1 for i in perm])
    torch.testing.assert_close(adv_flat[nondegenerate], ref[nondegenerate], rtol=1e-6, atol=1e-6)
    ref_dr = verl_grpo(flat, flat_ids, norm=False)
    dr = group_normalized_advantages(flat, flat_ids, std_normalize=False)
    torch.testing.assert_close(dr[nondegenerate], ref_dr[nondegenerate], rtol=0, atol=1e-7)


def test_float64_and_int_rewards():
    adv64 = group_normalized_advantages(torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    assert adv64.dtype == torch.float64
    assert adv64[0, 0].item() == pytest.approx(0.5 / (math.sqrt(0.5) + 1e-6), rel=1e-14)
    adv_int = group_normalized_advantages([[1, 0]])
    assert adv_int.dtype == torch.float32


def test_broadcast_to_tokens_masks_padding():
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    out = broadcast_to_tokens(adv, mask)
    assert out.tolist() == [[2.0, 2.0, 0.0], [0.0, -1.0, -1.0]]


def test_bad_inputs_name_the_problem():
    with pytest.raises(AdvantageInputError, match=r"flat \[B\] rewards need group_ids"):
        group_normalized_advantages(torch.tensor([1.0, 0.0]))
    with pytest.raises(AdvantageInputError, match="group_ids has 1 entries but rewards has 2"):
        group_normalized_advantages(torch.tensor([1.0, 0.0]), [0])
    with pytest.raises(AdvantageInputError, match=r"already grouped by row"):
        group_normalized_advantages(torch.zeros(2, 2), [0, 0, 1, 1])
    with pytest.raises(AdvantageInputError, match="rewards must be finite"):
        group_normalized_advantages(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(AdvantageInputError, match=r"response_mask must be \[B=2, T\]"):
        broadcast_to_tokens(torch.zeros(2), torch.ones(3, 4))
