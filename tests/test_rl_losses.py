"""Policy loss, aggregation, KL and metrics against hand-computed numbers; masking; micro-batching."""

from __future__ import annotations

import math

import pytest
import torch

from sfpo_megatron.algorithms.losses import (
    LossConfigError,
    LossDenominators,
    PolicyLossConfig,
    agg_loss,
    kl_penalty,
    mini_batch_denominators,
    policy_loss,
)

MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
RATIOS = [[1.5, 0.5, 1.0], [1.1, 0.7, 1.3]]
ADV = torch.tensor([1.0, -2.0])
# Hand-computed clipped per-token losses at eps 0.2 (see test_hand_computed_ppo_clip):
#   A=+1: r=1.5 -> max(-1.5, -1.2) = -1.2 (clipped); r=0.5 -> max(-0.5, -0.8) = -0.5
#   A=-2: r=1.1 -> max(2.2, 2.2) = 2.2; r=0.7 -> max(1.4, 1.6) = 1.6 (clipped); r=1.3 -> 2.6
TOKEN_LOSSES = [[-1.2, -0.5], [2.2, 1.6, 2.6]]


def _inputs(dtype=torch.float64):
    log_probs = torch.log(torch.tensor(RATIOS, dtype=dtype)).requires_grad_(True)
    old = torch.zeros(2, 3, dtype=dtype)
    return log_probs, old


@pytest.mark.parametrize("mode,expected", [
    ("token-mean", (-1.2 - 0.5 + 2.2 + 1.6 + 2.6) / 5),
    ("seq-mean-token-mean", ((-1.2 - 0.5) / 2 + (2.2 + 1.6 + 2.6) / 3) / 2),
    ("seq-mean-token-sum-norm", (-1.2 - 0.5 + 2.2 + 1.6 + 2.6) / (2 * 3)),
])
def test_hand_computed_ppo_clip(mode, expected):
    log_probs, old = _inputs()
    loss, m = policy_loss(log_probs, old, ADV, MASK, PolicyLossConfig(eps_clip=0.2, loss_agg_mode=mode))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert m["pg_clipfrac"].item() == pytest.approx(2 / 5)
    assert m["pg_clipfrac_lower"].item() == 0.0
    logs = [math.log(r) for r in (1.5, 0.5, 1.1, 0.7, 1.3)]
    assert m["ppo_kl"].item() == pytest.approx(-sum(logs) / 5, rel=1e-12)
    assert m["num_tokens"].item() == 5
    # Clipped tokens get no gradient; unclipped ones d(-A r)/d logp = -A r.
    (g,) = torch.autograd.grad(loss, log_probs)
    scale = {"token-mean": 1 / 5, "seq-mean-token-mean": None, "seq-mean-token-sum-norm": 1 / 6}[mode]
    per_token = torch.tensor([[0.0, -0.5, 0.0], [2.2, 0.0, 2.6]], dtype=torch.float64)
    if scale is None:
        per_token = per_token / torch.tensor([[2.0], [3.0]], dtype=torch.float64) / 2
    else:
        per_token = per_token * scale
    torch.testing.assert_close(g, per_token, rtol=1e-12, atol=0)


def test_clip_higher_and_no_clip():
    lp = torch.log(torch.tensor([[1.25]], dtype=torch.float64))
    old = torch.zeros(1, 1, dtype=torch.float64)
    mask = torch.ones(1, 1)
    adv = torch.tensor([1.0])
    sym, _ = policy_loss(lp, old, adv, mask, PolicyLossConfig(eps_clip=0.2))
    high, m = policy_loss(lp, old, adv, mask, PolicyLossConfig(eps_clip=0.2, eps_clip_high=0.28))
    none, _ = policy_loss(lp, old, adv, mask, PolicyLossConfig(eps_clip=None))
    assert sym.item() == pytest.approx(-1.2)
    assert high.item() == pytest.approx(-1.25) and m["pg_clipfrac"].item() == 0.0
    assert none.item() == pytest.approx(-1.25)
    low, _ = policy_loss(torch.log(torch.tensor([[0.5]], dtype=torch.float64)), old, -adv, mask,
                         PolicyLossConfig(eps_clip=0.1, eps_clip_high=0.3))
    assert low.item() == pytest.approx(0.9)  # A=-1, r=0.5 -> max(0.5, 0.9)


def test_dual_clip_caps_negative_advantages_only():
    lp = torch.log(torch.tensor([[4.0, 1.1], [4.0, 1.0]], dtype=torch.float64)).requires_grad_(True)
    old = torch.zeros(2, 2, dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([-2.0, 1.0])
    cfg = PolicyLossConfig(eps_clip=0.2, clip_ratio_c=3.0)
    loss, m = policy_loss(lp, old, adv, mask, cfg)
    # A=-2, r=4: max(8, 2.4) = 8 capped at -A*c = 6; A=-2, r=1.1: 2.2; A=+1, r=4: -1.2 (no dual clip).
    assert loss.item() == pytest.approx((6.0 + 2.2 - 1.2) / 3, rel=1e-12)
    assert m["pg_clipfrac_lower"].item() == pytest.approx(1 / 3)
    (g,) = torch.autograd.grad(loss, lp)
    assert g[0, 0].item() == 0.0 and g[1, 0].item() == 0.0
    assert g[0, 1].item() == pytest.approx(2.2 / 3)
    without, _ = policy_loss(lp, old, adv, mask, PolicyLossConfig(eps_clip=0.2))
    assert without.item() == pytest.approx((8.0 + 2.2 - 1.2) / 3, rel=1e-12)


def test_kl_penalty_matches_verl_formulas_and_clamps():
    lp = torch.tensor([math.log(0.5), 0.0, -50.0], dtype=torch.float64)
    ref = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)
    k3 = kl_penalty(lp, ref, "k3")
    assert k3[0].item() == pytest.approx(2.0 - math.log(2.0) - 1.0, rel=1e-12)
    assert k3[1].item() == 0.0
    assert k3[2].item() == 10.0  # log-ratio clamped to 20 -> e^20 - 21 -> clamped to 10
    assert torch.equal(kl_penalty(lp, ref, "low_var_kl"), k3)
    lp2 = torch.tensor([5.0, 50.0], dtype=torch.float64)
    k3_pos = kl_penalty(lp2, torch.zeros(2, dtype=torch.float64), "k3")
    assert k3_pos[0].item() == pytest.approx(math.exp(-5.0) + 5.0 - 1.0, rel=1e-12)
    assert k3_pos[1].item() == 10.0  # e^-20 + 19 -> clamped to 10
    assert kl_penalty(lp, ref, "k1")[0].item() == pytest.approx(-math.log(2))
    assert kl_penalty(lp, ref, "k2")[0].item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_penalty(lp, ref, "abs")[0].item() == pytest.approx(math.log(2))


def test_entropy_bonus_and_kl_terms():
    log_probs, old = _inputs()
    entropy = torch.tensor([[1.0, 3.0, 99.0], [2.0, 2.0, 5.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.zeros(2, 3, dtype=torch.float64)
    cfg = PolicyLossConfig(eps_clip=0.2, entropy_coeff=0.01, kl_coeff=0.5, kl_type="k3")
    loss, m = policy_loss(log_probs, old, ADV, MASK, cfg, entropy=entropy, ref_log_probs=ref)
    ent_mean = (1 + 3 + 2 + 2 + 5) / 5
    k3 = [1 / r + math.log(r) - 1 for r in (1.5, 0.5, 1.1, 0.7, 1.3)]
    pg = sum(sum(row) for row in TOKEN_LOSSES) / 5
    assert loss.item() == pytest.approx(pg - 0.01 * ent_mean + 0.5 * sum(k3) / 5, rel=1e-12)
    assert m["entropy"].item() == pytest.approx(ent_mean)
    assert m["kl"].item() == pytest.approx(sum(k3) / 5, rel=1e-12)
    (ge,) = torch.autograd.grad(loss, entropy)
    expected = torch.tensor([[-0.002, -0.002, 0.0], [-0.002, -0.002, -0.002]], dtype=torch.float64)
    torch.testing.assert_close(ge, expected, rtol=1e-12, atol=0)


def test_padding_garbage_contributes_nothing():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    f64 = dict(dtype=torch.float64)
    base = dict(lp=torch.randn(3, 5, **f64) * 0.1 - 1, old=torch.randn(3, 5, **f64) * 0.1 - 1,
                adv=torch.randn(3, 5, **f64), ent=torch.rand(3, 5, **f64),
                ref=torch.randn(3, 5, **f64) * 0.1 - 1)
    dirty = {k: v.clone() for k, v in base.items()}
    pad = ~mask.bool()
    dirty["lp"][pad] = float("nan")
    dirty["old"][pad] = float("inf")
    dirty["adv"][pad] = float("nan")
    dirty["ent"][pad] = float("-inf")
    dirty["ref"][pad] = 1e30
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        cfg = PolicyLossConfig(eps_clip=0.2, clip_ratio_c=3.0, entropy_coeff=0.01, kl_coeff=0.1,
                               loss_agg_mode=mode)
        results = []
        for d in (base, dirty):
            lp = d["lp"].clone().requires_grad_(True)
            ent = d["ent"].clone().requires_grad_(True)
            loss, m = policy_loss(lp, d["old"], d["adv"], mask, cfg, entropy=ent, ref_log_probs=d["ref"])
            g_lp, g_ent = torch.autograd.grad(loss, (lp, ent))
            results.append((loss, g_lp, g_ent, m))
        (l0, a0, b0, m0), (l1, a1, b1, m1) = results
        assert torch.isfinite(l1) and l1.item() == l0.item()
        assert torch.equal(a0, a1) and torch.equal(b0, b1)
        assert (a1[pad] == 0).all() and (b1[pad] == 0).all()
        for k in m0:
            assert m0[k].item() == m1[k].item(), k


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_sum_to_the_mini_batch_gradient(mode):
    g = torch.Generator().manual_seed(1)
    B, T, V = 7, 6, 5
    logits = torch.randn(B, T, V, dtype=torch.float64, generator=g).requires_grad_(True)
    target = torch.randint(0, V, (B, T), generator=g)
    lengths = [6, 1, 0, 4, 3, 6, 2]  # one sequence without any valid token
    mask = torch.tensor([[1 if t < n else 0 for t in range(T)] for n in lengths])
    old = torch.randn(B, T, dtype=torch.float64, generator=g) * 0.2 - 1.5
    adv = torch.randn(B, dtype=torch.float64, generator=g)
    ref = torch.randn(B, T, dtype=torch.float64, generator=g) * 0.2 - 1.5
    cfg = PolicyLossConfig(eps_clip=0.2, eps_clip_high=0.3, clip_ratio_c=3.0, loss_agg_mode=mode,
                           entropy_coeff=0.01, kl_coeff=0.05)

    def forward(sl):
        log_p = torch.log_softmax(logits[sl], dim=-1)
        lp = log_p.gather(-1, target[sl].unsqueeze(-1)).squeeze(-1)
        ent = -(log_p.exp() * log_p).sum(-1)
        return lp, ent

    lp, ent = forward(slice(None))
    full, _ = policy_loss(lp, old, adv, mask, cfg, entropy=ent, ref_log_probs=ref)
    (g_full,) = torch.autograd.grad(full, logits)

    den = mini_batch_denominators(mask)
    assert (den.num_tokens, den.num_seqs, den.loss_scale_factor) == (22.0, 6.0, 6.0)
    assert mini_batch_denominators([mask[:2], mask[2:3], mask[3:]]) == den
    assert mini_batch_denominators([mask[:2], mask[2:, :4]], loss_scale_factor=6) == \
        LossDenominators(22.0 - 2.0, 6.0, 6.0)  # the length-6 row at index 5 loses 2 tokens to the cut
    with pytest.raises(LossConfigError, match=r"different lengths \[4, 6\]: pass loss_scale_factor"):
        mini_batch_denominators([mask[:2], mask[2:, :4]])
    total = 0.0
    for sl in (slice(0, 2), slice(2, 3), slice(3, 7)):
        lp, ent = forward(sl)
        part, _ = policy_loss(lp, old[sl], adv[sl], mask[sl], cfg, entropy=ent,
                              ref_log_probs=ref[sl], denominators=den)
        total = total + part
    (g_split,) = torch.autograd.grad(total, logits)
    assert total.item() == pytest.approx(full.item(), rel=1e-13)
    torch.testing.assert_close(g_split, g_full, rtol=1e-12, atol=1e-15)


def test_agg_loss_matches_verl_global_batch_formulas():
    loss_mat = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    assert agg_loss(loss_mat, mask, "token-mean").item() == pytest.approx(18 / 5)
    assert agg_loss(loss_mat, mask, "seq-mean-token-mean").item() == pytest.approx((1.5 + 5.0) / 2)
    assert agg_loss(loss_mat, mask, "seq-mean-token-sum-norm").item() == pytest.approx(18 / (2 * 3))
    den = LossDenominators(num_tokens=10, num_seqs=4, loss_scale_factor=8)
    assert agg_loss(loss_mat, mask, "seq-mean-token-sum-norm", den).item() == pytest.approx(18 / 32)
    empty = agg_loss(loss_mat, torch.zeros(3, 3), "token-mean")
    assert empty.item() == 0.0


def test_truncated_is_seq_weights_hook():
    log_probs, old = _inputs()
    cfg = PolicyLossConfig(eps_clip=0.2)
    plain, _ = policy_loss(log_probs, old, ADV, MASK, cfg)
    ones, _ = policy_loss(log_probs, old, ADV, MASK, cfg, seq_weights=torch.ones(2, dtype=torch.float64))
    assert torch.equal(plain, ones)  # w == 1 (on-policy): bit-identical to the synchronous loss
    weighted, _ = policy_loss(log_probs, old, ADV, MASK, cfg, seq_weights=torch.tensor([2.0, 0.5]))
    expected = (2.0 * (-1.2 - 0.5) + 0.5 * (2.2 + 1.6 + 2.6)) / 5
    assert weighted.item() == pytest.approx(expected, rel=1e-12)


def test_bad_settings_name_the_value():
    with pytest.raises(LossConfigError, match="loss_agg_mode must be one of .* got 'seq-mean'"):
        PolicyLossConfig(loss_agg_mode="seq-mean")
    with pytest.raises(LossConfigError, match=r"clip_ratio_c \(dual clip\) must be > 1.0, got 0.5"):
        PolicyLossConfig(clip_ratio_c=0.5)
    with pytest.raises(LossConfigError, match="kl_type must be one of .* got 'k9'"):
        PolicyLossConfig(kl_type="k9")
    with pytest.raises(LossConfigError, match=r"eps_clip must be in \[0, 1\), got 1.5"):
        PolicyLossConfig(eps_clip=1.5)
    log_probs, old = _inputs()
    with pytest.raises(LossConfigError, match="kl_coeff=0.1 needs ref_log_probs"):
        policy_loss(log_probs, old, ADV, MASK, PolicyLossConfig(kl_coeff=0.1))
    with pytest.raises(LossConfigError, match="entropy_coeff=0.01 needs the per-token entropy"):
        policy_loss(log_probs, old, ADV, MASK, PolicyLossConfig(entropy_coeff=0.01))
    with pytest.raises(LossConfigError,
                       match=r"old_log_probs has shape \(2, 2\) but response_mask has \(2, 3\)"):
        policy_loss(log_probs, old[:, :2], ADV, MASK, PolicyLossConfig())
    with pytest.raises(LossConfigError, match=r"seq_weights must be \[B=2\]"):
        policy_loss(log_probs, old, ADV, MASK, PolicyLossConfig(), seq_weights=torch.ones(3))
