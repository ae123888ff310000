"""The plain-PyTorch SFPO reference (tests/reference_sfpo.py) on a tiny causal LM: its special
cases reduce exactly to GRPO passes, and the general case is fast passes → reposition → slow pass.
Then the reference and the project against numbers computed by hand (loss, log-probs at a
temperature, advantages): the two are written independently, and a hand-computed value is what
catches an error they would share."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from reference_sfpo import (
    LossConfig,
    RolloutBatch,
    collate,
    group_advantages,
    grpo_step,
    policy_pass,
    ppo_loss,
    response_values,
    sfpo_step,
    token_log_probs,
    with_log_probs,
)
from torch import nn

from sfpo_megatron.algorithms.advantages import group_normalized_advantages
from sfpo_megatron.algorithms.losses import PolicyLossConfig, policy_loss
from sfpo_megatron.trainer.vocab_parallel import (
    logprobs_and_entropy_from_full_logits,
    vocab_parallel_logprobs_and_entropy,
)

VOCAB, HIDDEN, BATCH, SEQ, PROMPT = 11, 16, 8, 8, 3
LOSS = LossConfig(eps_clip=0.2, entropy_coeff=0.001, agg_mode="token-mean")


class TinyCausalLM(nn.Module):
    """Embedding → causal running mean → MLP → vocab head: small, causal, all parameters used."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.mlp = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh())
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        steps = torch.arange(1, input_ids.shape[1] + 1, dtype=h.dtype).view(1, -1, 1)
        return self.head(self.mlp(h.cumsum(dim=1) / steps))


def make_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = TinyCausalLM()
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
    lengths = torch.randint(1, SEQ - PROMPT + 1, (BATCH,), generator=g)  # response lengths
    pos = torch.arange(1, SEQ).unsqueeze(0)  # index of the target token of each [B, S-1] slot
    response_mask = (pos >= PROMPT) & (pos < PROMPT + lengths.unsqueeze(1))
    tokens = torch.where(torch.arange(SEQ).unsqueeze(0) < PROMPT + lengths.unsqueeze(1), tokens, 0)
    rewards = torch.randint(0, 2, (BATCH,), generator=g).float()
    rewards[0], rewards[1] = 1.0, 0.0  # at least one group with a nonzero advantage
    advantages = group_advantages(rewards.tolist(), [i // 4 for i in range(BATCH)]).float()
    return model, with_log_probs(RolloutBatch(tokens, response_mask, advantages), model)


def make_opt(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01)


def assert_same_state(m1, o1, m2, o2, exact: bool = True) -> None:
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        if exact:
            assert torch.equal(p1, p2), n
        else:
            torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6, msg=n)
    s1, s2 = o1.state_dict()["state"], o2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            if exact:
                assert torch.equal(s1[k][name], s2[k][name]), (k, name)
            else:
                torch.testing.assert_close(s1[k][name], s2[k][name], rtol=1e-5, atol=1e-7)


def run_plain_passes(model, batch, passes: int, **kw):
    opt = make_opt(model)
    for _ in range(passes):
        policy_pass(model, opt, batch, num_mini_batches=2, loss_config=LOSS, grad_clip=1.0, **kw)
    return opt


@pytest.mark.parametrize("alpha,inner_steps", [(0.0, 3), (1.0, 0)])
def test_degenerate_cases_equal_one_grpo_pass_exactly(alpha, inner_steps):
    base, batch = make_setup()
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    o1 = make_opt(m1)
    out = sfpo_step(m1, o1, batch, alpha=alpha, inner_steps=inner_steps, num_mini_batches=2,
                    loss_config=LOSS, grad_clip=1.0)
    o2 = run_plain_passes(m2, batch, 1)
    assert_same_state(m1, o1, m2, o2, exact=True)
    assert not torch.equal(next(m1.parameters()), next(base.parameters()))  # it did train
    assert list(out["passes"]) == ["slow"]


def test_alpha_one_is_k_plus_one_plain_passes_exactly():
    base, batch = make_setup(seed=1)
    m1, m2, m3 = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    o1 = make_opt(m1)
    out = sfpo_step(m1, o1, batch, alpha=1.0, inner_steps=3, num_mini_batches=2, loss_config=LOSS,
                    grad_clip=1.0)
    o2 = run_plain_passes(m2, batch, 4)
    assert_same_state(m1, o1, m2, o2, exact=True)
    assert list(out["passes"]) == ["fast0", "fast1", "fast2", "slow"]
    # Old log-probs are computed once at θ(s,0): zero drift on the very first mini-batch only.
    assert out["passes"]["fast0"][0]["ppo_kl"] == 0.0
    assert out["passes"]["slow"][0]["ppo_kl"] != 0.0
    assert out["reposition_norm"] == out["fast_displacement_norm"] > 0
    # GRPO with 4 PPO epochs is the same 4 passes.
    o3 = make_opt(m3)
    grpo = grpo_step(m3, o3, batch, epochs=4, num_mini_batches=2, loss_config=LOSS, grad_clip=1.0)
    assert_same_state(m1, o1, m3, o3, exact=True)
    assert list(grpo["passes"]) == ["epoch0", "epoch1", "epoch2", "epoch3"]


def test_general_alpha_is_fast_reposition_slow_with_adam_state_carried():
    base, batch = make_setup(seed=2)
    alpha, k = 0.5, 2
    m1 = copy.deepcopy(base)
    o1 = make_opt(m1)
    out = sfpo_step(m1, o1, batch, alpha=alpha, inner_steps=k, num_mini_batches=2, loss_config=LOSS,
                    grad_clip=1.0)

    # The same schedule written out by hand, interpolating with the paper's formula.
    m2 = copy.deepcopy(base)
    theta0 = [p.detach().clone() for p in m2.parameters()]
    o2 = run_plain_passes(m2, batch, k)
    with torch.no_grad():
        for p, p0 in zip(m2.parameters(), theta0):
            p.copy_(p0 + alpha * (p - p0))
    policy_pass(m2, o2, batch, num_mini_batches=2, loss_config=LOSS, grad_clip=1.0)
    assert_same_state(m1, o1, m2, o2, exact=False)
    # Adam's step count kept counting through all K + 1 passes (2 mini-batches each).
    assert all(int(s["step"]) == (k + 1) * 2 for s in o1.state_dict()["state"].values())
    assert out["reposition_norm"] == pytest.approx(alpha * out["fast_displacement_norm"], rel=1e-5)

    # And it is neither one GRPO pass nor K+1 passes.
    m3, m4 = copy.deepcopy(base), copy.deepcopy(base)
    run_plain_passes(m3, batch, 1)
    run_plain_passes(m4, batch, k + 1)
    w1 = torch.cat([p.detach().reshape(-1) for p in m1.parameters()])
    for other in (m3, m4):
        w = torch.cat([p.detach().reshape(-1) for p in other.parameters()])
        assert (w1 - w).abs().max() > 1e-4


def test_lr_scheduler_steps_once_per_rollout_batch_and_bad_args():
    base, batch = make_setup(seed=3)
    opt = make_opt(base)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    seen = []
    sfpo_step(base, opt, batch, alpha=0.8, inner_steps=2, num_mini_batches=4, loss_config=LOSS,
              lr_scheduler=sched, on_pass=lambda stage, m: seen.append((stage, len(m))))
    assert sched.last_epoch == 1
    assert seen == [("fast0", 4), ("fast1", 4), ("slow", 4)]
    with pytest.raises(ValueError, match="batch of 8 sequences does not split into 3 mini-batches"):
        sfpo_step(base, opt, batch, alpha=0.8, inner_steps=1, num_mini_batches=3, loss_config=LOSS)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.2"):
        sfpo_step(base, opt, batch, alpha=1.2, inner_steps=1, num_mini_batches=2, loss_config=LOSS)


class _Sample:
    def __init__(self, prompt_ids, response_ids, advantage):
        self.prompt_ids, self.response_ids, self.advantage = prompt_ids, response_ids, advantage


def test_collate_places_responses_after_their_prompts():
    samples = [_Sample([5, 6, 7], [20, 21], 1.5), _Sample([9], [30, 31, 32, 33], -0.5),
               _Sample([4, 4], [], 0.0)]
    b = collate(samples, pad_id=1)
    assert b.tokens.tolist() == [[5, 6, 7, 20, 21], [9, 30, 31, 32, 33], [4, 4, 1, 1, 1]]
    # Position t predicts tokens[:, t + 1]: the response targets only.
    assert b.response_mask.int().tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert b.advantages.tolist() == [1.5, -0.5, 0.0]
    targets = b.tokens[:, 1:].float()
    assert response_values(targets, samples).tolist() == [20, 21, 30, 31, 32, 33]


# ---- the reference and the project against hand-computed numbers --------------------------------

# Two sequences (the first has 2 response tokens, the second 3), ratios π/π_old per token,
# advantages +1 and -2, clip 0.2, dual clip c = 3. Objective min(rA, clip(r)A) (max with cA for
# A < 0), token by token, as a loss (its negative):
#   A=+1: r=1.5 -> min(1.5, 1.2) = 1.2 -> -1.2 (clipped); r=0.5 -> min(0.5, 0.8) -> -0.5
#   A=-2: r=1.1 -> 2.2; r=0.7 -> min(-1.4, -1.6) -> 1.6 (clipped);
#         r=4.0 -> min(-8, -2.4) = -8, dual clip max(-8, -6) -> 6.0
MASK = torch.tensor([[True, True, False], [True, True, True]])
RATIOS = [[1.5, 0.5, 1.0], [1.1, 0.7, 4.0]]
ADV = torch.tensor([1.0, -2.0], dtype=torch.float64)
PG = [[-1.2, -0.5], [2.2, 1.6, 6.0]]
ENTROPY = [[1.0, 2.0, 99.0], [0.5, 0.5, 2.0]]  # 99: padding, never counted
# log π_ref − log π per token: k3 = e^d − d − 1 -> ln 2: 1 − ln 2; −ln 2: ln 2 − 1/2; 0: 0.
D = [[math.log(2), 0.0, 0.0], [0.0, -math.log(2), 0.0]]
K3 = [[1 - math.log(2), 0.0], [0.0, math.log(2) - 0.5, 0.0]]
ENT_COEF, KL_COEF = 0.1, 0.2


def _hand_loss(mode: str) -> float:
    def agg(rows):
        if mode == "token-mean":
            return sum(map(sum, rows)) / 5
        if mode == "seq-mean-token-mean":
            return (sum(rows[0]) / 2 + sum(rows[1]) / 3) / 2
        return sum(map(sum, rows)) / (2 * 3)  # seq-mean-token-sum-norm, L = T = 3

    entropy = [ENTROPY[0][:2], ENTROPY[1]]
    return agg(PG) - ENT_COEF * agg(entropy) + KL_COEF * agg(K3)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_reference_and_project_loss_equal_the_hand_computed_value(mode):
    expected = _hand_loss(mode)
    results = {}
    for side in ("reference", "project"):
        log_probs = torch.log(torch.tensor(RATIOS, dtype=torch.float64)).requires_grad_(True)
        old = torch.zeros(2, 3, dtype=torch.float64)
        entropy = torch.tensor(ENTROPY, dtype=torch.float64, requires_grad=True)
        ref = log_probs.detach() + torch.tensor(D, dtype=torch.float64)
        if side == "reference":
            cfg = LossConfig(eps_clip=0.2, dual_clip_c=3.0, agg_mode=mode, entropy_coeff=ENT_COEF,
                             kl_coeff=KL_COEF, kl_type="low_var_kl")
            loss, m = ppo_loss(log_probs, old, ADV, MASK, cfg, entropy=entropy, ref_log_probs=ref)
            clipfrac, lower = m["pg_clipfrac"], m["pg_clipfrac_lower"]
        else:
            cfg = PolicyLossConfig(eps_clip=0.2, clip_ratio_c=3.0, loss_agg_mode=mode,
                                   entropy_coeff=ENT_COEF, kl_coeff=KL_COEF, kl_type="low_var_kl")
            loss, m = policy_loss(log_probs, old, ADV, MASK, cfg, entropy=entropy,
                                  ref_log_probs=ref)
            clipfrac, lower = float(m["pg_clipfrac"]), float(m["pg_clipfrac_lower"])
        assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-15), side
        assert (clipfrac, lower) == (pytest.approx(2 / 5), pytest.approx(1 / 5)), side
        results[side] = torch.autograd.grad(loss, (log_probs, entropy))
    if mode == "token-mean":
        # d/d log π: -A·r on unclipped tokens (/5), plus KL_COEF · (1 − e^d) / 5; entropy: -0.1/5.
        g_lp = torch.tensor([[-0.2 * 1 / 5, -0.5 / 5, 0.0], [2.2 / 5, 0.2 * 0.5 / 5, 0.0]],
                            dtype=torch.float64)
        g_ent = torch.tensor([[-0.02, -0.02, 0.0], [-0.02, -0.02, -0.02]], dtype=torch.float64)
        for side, (a, b) in results.items():
            torch.testing.assert_close(a, g_lp, rtol=1e-12, atol=1e-15, msg=side)
            torch.testing.assert_close(b, g_ent, rtol=1e-12, atol=1e-15, msg=side)


def test_reference_and_project_log_probs_at_temperature_equal_the_hand_computed_values():
    # At T = 0.5 the logits [0, ln 3 / 2, ln 4 / 2] give softmax([0, ln 3, ln 4]) = [1, 3, 4] / 8.
    logits = torch.tensor([[[0.0, math.log(3) / 2, math.log(4) / 2]] * 2], dtype=torch.float64)
    tokens = torch.tensor([[0, 1]])  # position 0 predicts token 1
    expected_lp = math.log(3 / 8)
    expected_h = -sum(p * math.log(p) for p in (1 / 8, 3 / 8, 1 / 2))
    lp, h = token_log_probs(lambda t: logits, tokens, temperature=0.5)
    assert (lp.item(), h.item()) == (pytest.approx(expected_lp, rel=1e-12),
                                     pytest.approx(expected_h, rel=1e-12))
    lp, h = logprobs_and_entropy_from_full_logits(logits[:, :1], tokens[:, 1:], temperature=0.5)
    assert (lp.item(), h.item()) == (pytest.approx(expected_lp, rel=1e-12),
                                     pytest.approx(expected_h, rel=1e-12))
    # The megatron path's function, with a padded vocabulary column that must be dropped.
    padded = torch.cat([logits[:, :1], torch.full((1, 1, 1), 50.0, dtype=torch.float64)], -1)
    lp, h = vocab_parallel_logprobs_and_entropy(padded, tokens[:, 1:], temperature=0.5,
                                                vocab_size=3)
    assert (lp.item(), h.item()) == (pytest.approx(expected_lp, rel=1e-12),
                                     pytest.approx(expected_h, rel=1e-12))


def test_reference_and_project_advantages_equal_the_hand_computed_values():
    # Group [1, 0, 0, 0]: mean 1/4, unbiased std sqrt((9/16 + 3/16) / 3) = 1/2; group [1, 1]: 0.
    rewards, groups = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0], [7, 7, 7, 7, 3, 3]
    expected = [0.75 / (0.5 + 1e-6)] + [-0.25 / (0.5 + 1e-6)] * 3 + [0.0, 0.0]
    for adv in (group_advantages(rewards, groups),
                group_normalized_advantages(torch.tensor(rewards, dtype=torch.float64), groups)):
        assert adv.tolist() == pytest.approx(expected, rel=1e-12)
