"""VCPO pure functions against hand-computed numbers (DP all-reduce paths: test_rl_vocab_parallel)."""

from __future__ import annotations

import math

import pytest
import torch

from sfpo_megatron.algorithms.advantages import group_normalized_advantages
from sfpo_megatron.algorithms.vcpo import (
    VCPOError,
    effective_sample_size,
    ess_lr_scale,
    importance_weight_stats,
    opob_advantages,
    opob_baseline,
    sequence_log_ratio,
    truncated_is_weights,
)


def test_known_weights_give_exact_ess_and_scaled_lr():
    res = effective_sample_size(torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)))
    assert res.ess == pytest.approx(100.0 / 30.0, rel=1e-14)  # (1+2+3+4)^2 / (1+4+9+16)
    assert res.num_samples == 4
    assert res.rho == pytest.approx(100.0 / 120.0, rel=1e-14)
    assert ess_lr_scale(res.rho, 1.0, "sqrt") == pytest.approx(math.sqrt(5.0 / 6.0), rel=1e-14)
    assert ess_lr_scale(res.rho, 1.0, "linear") == pytest.approx(5.0 / 6.0, rel=1e-14)
    assert ess_lr_scale(res.rho, 1.0, "none") == 1.0
    assert ess_lr_scale(res.rho, 0.55, "sqrt") == 1.0  # ρ/ρ_base > 1 is capped at 1
    assert ess_lr_scale(res.rho, 2.0, "sqrt") == pytest.approx(math.sqrt(5.0 / 12.0), rel=1e-14)
    assert 1e-6 * ess_lr_scale(res.rho) == pytest.approx(9.128709291752769e-07, rel=1e-14)


def test_on_policy_weights_change_nothing():
    res = effective_sample_size(torch.zeros(6))
    assert res.ess == pytest.approx(6.0, rel=1e-15) and res.rho == pytest.approx(1.0, rel=1e-15)
    for mode in ("sqrt", "linear", "none"):
        assert ess_lr_scale(res.rho, 1.0, mode) == 1.0
    assert torch.equal(truncated_is_weights(torch.zeros(6)), torch.ones(6))


def test_ess_is_stable_for_huge_log_weights():
    res = effective_sample_size(torch.tensor([1000.0, 1000.0, 0.0], dtype=torch.float64))
    assert res.ess == pytest.approx(2.0, rel=1e-12)  # e^1000 overflows; log space does not


def test_sequence_log_ratio_and_truncation():
    lp = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, -0.5, -0.5]])
    mu = torch.tensor([[-1.5, -1.0, 0.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    lw = sequence_log_ratio(lp, mu, mask)
    assert lw.dtype == torch.float64 and lw.tolist() == pytest.approx([-0.5, 1.5])
    tis = truncated_is_weights(torch.tensor([0.0, math.log(10.0), -1.0, 1000.0], dtype=torch.float64))
    assert tis.tolist() == pytest.approx([1.0, 8.0, math.exp(-1.0), 8.0], rel=1e-14)
    assert truncated_is_weights(torch.tensor([math.log(3.0)]), threshold=2.0).item() == pytest.approx(2.0)


def test_opob_baseline_and_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 2.0, 0.0])
    weights = torch.tensor([1.0, 2.0, 1.0, 3.0, 0.5, 1.0, 1.0])
    g2 = torch.tensor([1.0, 1.0, 4.0, 2.0, 2.0, 0.0, 0.0])
    ids = ["a", "a", "a", "b", "b", "c", "c"]
    b = opob_baseline(rewards, weights, g2, ids)
    # group a: w²‖g‖² = [1, 4, 4] -> b* = (1·1 + 4·0 + 4·0) / 9; b: equal rewards -> 1;
    # c: all ‖g‖² = 0 -> falls back to the plain mean 1.
    assert b.tolist() == pytest.approx([1 / 9] * 3 + [1.0] * 2 + [1.0] * 2, rel=1e-14)
    adv = opob_advantages(rewards, weights, g2, ids)
    sa = math.sqrt(1.0 / 3.0) + 1e-6  # unbiased std of (1, 0, 0)
    sc = math.sqrt(2.0) + 1e-6  # unbiased std of (2, 0)
    expected = [(1 - 1 / 9) / sa, -1 / 9 / sa, -1 / 9 / sa, 0.0, 0.0, 1 / sc, -1 / sc]
    assert adv.tolist() == pytest.approx(expected, rel=1e-12)
    assert adv[3].item() == 0.0 and adv[4].item() == 0.0
    dr = opob_advantages(rewards, weights, g2, ids, std_normalize=False)
    assert dr[:3].tolist() == pytest.approx([8 / 9, -1 / 9, -1 / 9], rel=1e-14)
    # the VCPO reference code's normalisation: population std, no epsilon
    pa, pc = math.sqrt(2.0 / 9.0), 1.0  # population std of (1, 0, 0) and of (2, 0)
    pop = opob_advantages(rewards, weights, g2, ids, std="population")
    assert pop.tolist() == pytest.approx([(1 - 1 / 9) / pa, -1 / 9 / pa, -1 / 9 / pa, 0.0, 0.0,
                                          1 / pc, -1 / pc], rel=1e-12)
    assert pop[3].item() == 0.0 and pop[4].item() == 0.0
    with pytest.raises(VCPOError, match=r"std must be one of \('unbiased', 'population'\), got 'sample'"):
        opob_advantages(rewards, weights, g2, ids, std="sample")


def test_unit_weights_and_equal_grad_norms_give_the_group_mean():
    g = torch.Generator().manual_seed(3)
    rewards = torch.randint(0, 2, (24,), generator=g).double()
    ids = [i // 6 for i in range(24)]
    ones = torch.ones(24, dtype=torch.float64)
    means = torch.tensor([rewards[i // 6 * 6:(i // 6 + 1) * 6].mean().item() for i in range(24)],
                         dtype=torch.float64)
    torch.testing.assert_close(opob_baseline(rewards, ones, ones * 2.5, ids), means, rtol=1e-14, atol=0)
    torch.testing.assert_close(opob_advantages(rewards, ones, ones * 2.5, ids),
                               group_normalized_advantages(rewards, ids), rtol=1e-12, atol=1e-12)


def test_weight_stats_single_rank():
    stats = importance_weight_stats(torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])))
    assert stats["is_weight/max"] == pytest.approx(10.0)
    assert stats["is_weight/min"] == pytest.approx(1.0)
    assert stats["is_weight/mean"] == pytest.approx(4.0)
    assert stats["is_weight/p50"] == pytest.approx(3.0)
    assert stats["is_weight/p90"] == pytest.approx(7.6)  # linear interpolation 4 + 0.6 * 6


def test_bad_inputs_name_the_value():
    with pytest.raises(VCPOError, match=r"--ess-lr-scaling must be one of .* got 'cube'"):
        ess_lr_scale(0.5, mode="cube")
    with pytest.raises(VCPOError, match="--ess-rho-base must be > 0, got 0"):
        ess_lr_scale(0.5, rho_base=0)
    with pytest.raises(VCPOError, match=r"rho = ESS/B must be in \(0, 1\], got 1.5"):
        ess_lr_scale(1.5)
    with pytest.raises(VCPOError, match="tis threshold must be > 0, got -1"):
        truncated_is_weights(torch.zeros(2), threshold=-1)
    with pytest.raises(VCPOError, match="weights and grad_sq_norms must be finite and >= 0"):
        opob_baseline(torch.zeros(2), torch.tensor([1.0, -1.0]), torch.ones(2), [0, 0])
    with pytest.raises(VCPOError, match=r"must all be \[B\]"):
        opob_baseline(torch.zeros(2), torch.ones(3), torch.ones(2), [0, 0])
    with pytest.raises(VCPOError, match="empty mini-batch"):
        effective_sample_size(torch.zeros(0))
    with pytest.raises(VCPOError, match=r"must all be the same \[B, T\]"):
        sequence_log_ratio(torch.zeros(2, 3), torch.zeros(2, 2), torch.ones(2, 3))
