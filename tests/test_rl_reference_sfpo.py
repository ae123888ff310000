"""The plain-PyTorch SFPO reference (tests/reference_sfpo.py) on a tiny causal LM: its special
cases reduce exactly to GRPO passes, and the general case is fast passes → reposition → slow pass."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

try:
    from reference_sfpo import RolloutBatch, compute_old_log_probs, policy_pass, sfpo_step
except ImportError:  # tests/ imported as a package
    from tests.reference_sfpo import RolloutBatch, compute_old_log_probs, policy_pass, sfpo_step

from sfpo_megatron.algorithms.advantages import group_normalized_advantages
from sfpo_megatron.algorithms.losses import PolicyLossConfig

VOCAB, HIDDEN, BATCH, SEQ, PROMPT = 11, 16, 8, 8, 3
LOSS = PolicyLossConfig(eps_clip=0.2, entropy_coeff=0.001, loss_agg_mode="token-mean")


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
    input_ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
    lengths = torch.randint(1, SEQ - PROMPT + 1, (BATCH,), generator=g)  # response lengths
    pos = torch.arange(1, SEQ).unsqueeze(0)  # index of the target token of each [B, S-1] slot
    response_mask = ((pos >= PROMPT) & (pos < PROMPT + lengths.unsqueeze(1))).long()
    input_ids = torch.where(torch.arange(SEQ).unsqueeze(0) < PROMPT + lengths.unsqueeze(1), input_ids, 0)
    rewards = torch.randint(0, 2, (BATCH // 4, 4), generator=g).float()
    rewards[0, 0], rewards[0, 1] = 1.0, 0.0  # at least one group with a nonzero advantage
    advantages = group_normalized_advantages(rewards).reshape(-1)
    old = compute_old_log_probs(model, input_ids)
    return model, RolloutBatch(input_ids, response_mask, old, advantages)


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
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
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
