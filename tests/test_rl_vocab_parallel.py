"""Vocab-parallel log-prob / entropy at TP=2 vs the full-vocab TP=1 computation (values and
gradients), and DP=2 loss aggregation / ESS with real all-reduces, on two torchrun processes.

The pytest test launches this same file under ``torchrun --nproc_per_node 2``; the ``__main__``
part is the worker. Single-process checks run in pytest directly.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from launch import torchrun

from sfpo_megatron.trainer.vocab_parallel import (
    VocabParallelError,
    logprobs_and_entropy_from_full_logits,
    vocab_parallel_logprobs,
    vocab_parallel_logprobs_and_entropy,
)

S, B, V, TP = 5, 3, 16, 2


def _case(dtype: torch.dtype, seed: int, vocab: int = V):
    g = torch.Generator().manual_seed(seed)
    full = (torch.randn(S, B, vocab, generator=g, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, vocab, (S, B), generator=g)
    c_lp = torch.randn(S, B, generator=g, dtype=torch.float64)
    c_ent = torch.randn(S, B, generator=g, dtype=torch.float64)
    return full, target, c_lp, c_ent


def _reference(full, target, c_lp, c_ent, temperature, real_vocab=None):
    x = full.detach().clone().requires_grad_(True)
    used = x if real_vocab is None else x[..., :real_vocab]
    lp, ent = logprobs_and_entropy_from_full_logits(used, target, temperature=temperature)
    loss = (c_lp.to(lp.dtype) * lp + c_ent.to(ent.dtype) * ent).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return lp.detach(), ent.detach(), grad


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


# ------------------------------------------------------------------------------------------
# Worker (runs under torchrun)
# ------------------------------------------------------------------------------------------
def _tp_checks(rank: int) -> dict[str, float]:
    errors: dict[str, float] = {}
    part = V // TP
    for dtype in (torch.float32, torch.float64):
        for temperature in (1.0, 0.7):
            full, target, c_lp, c_ent = _case(dtype, seed=11)
            ref_lp, ref_ent, ref_grad = _reference(full, target, c_lp, c_ent, temperature)
            shard = full[..., rank * part:(rank + 1) * part].clone().requires_grad_(True)
            lp, ent = vocab_parallel_logprobs_and_entropy(shard, target, temperature=temperature)
            loss = (c_lp.to(lp.dtype) * lp + c_ent.to(ent.dtype) * ent).sum()
            (grad,) = torch.autograd.grad(loss, shard)
            key = f"{str(dtype).split('.')[-1]}_T{temperature}"
            errors[f"fused_lp_{key}"] = _max_err(lp, ref_lp)
            errors[f"fused_ent_{key}"] = _max_err(ent, ref_ent)
            errors[f"fused_grad_{key}"] = _max_err(grad, ref_grad[..., rank * part:(rank + 1) * part])

            if dtype != torch.float32:
                continue  # megatron's cross entropy computes in fp32 whatever the input dtype
            # log-prob only, through megatron's vocab_parallel_cross_entropy
            shard2 = full[..., rank * part:(rank + 1) * part].clone().requires_grad_(True)
            lp2 = vocab_parallel_logprobs(shard2, target, temperature=temperature)
            (grad2,) = torch.autograd.grad((c_lp.to(lp2.dtype) * lp2).sum(), shard2)
            ref_lp_only = _reference(full, target, c_lp, torch.zeros_like(c_ent), temperature)
            errors[f"mcore_lp_{key}"] = _max_err(lp2, ref_lp_only[0])
            errors[f"mcore_grad_{key}"] = _max_err(
                grad2, ref_lp_only[2][..., rank * part:(rank + 1) * part])

    # Padded vocab: 13 real tokens of 16 (rank 1 holds 5 real + 3 padding columns) and 7 real
    # tokens (rank 1's shard is entirely padding).
    for real in (13, 7):
        full, _, c_lp, c_ent = _case(torch.float64, seed=12)
        target = torch.randint(0, real, (S, B), generator=torch.Generator().manual_seed(3))
        ref_lp, ref_ent, ref_grad = _reference(full, target, c_lp, c_ent, 0.9, real_vocab=real)
        shard = full[..., rank * part:(rank + 1) * part].clone().requires_grad_(True)
        lp, ent = vocab_parallel_logprobs_and_entropy(shard, target, temperature=0.9, vocab_size=real)
        (grad,) = torch.autograd.grad((c_lp * lp + c_ent * ent).sum(), shard)
        errors[f"padded{real}_lp"] = _max_err(lp, ref_lp)
        errors[f"padded{real}_ent"] = _max_err(ent, ref_ent)
        errors[f"padded{real}_grad"] = _max_err(grad, ref_grad[..., rank * part:(rank + 1) * part])

    # bf16 logits (what megatron's output layer produces with --bf16) are reduced in fp32.
    full, target, c_lp, c_ent = _case(torch.bfloat16, seed=13)
    ref_lp, ref_ent, ref_grad = _reference(full.float(), target, c_lp, c_ent, 1.0)
    shard = full[..., rank * part:(rank + 1) * part].clone().requires_grad_(True)
    lp, ent = vocab_parallel_logprobs_and_entropy(shard, target)
    (grad,) = torch.autograd.grad((c_lp.float() * lp + c_ent.float() * ent).sum(), shard)
    errors["bf16_lp"] = _max_err(lp, ref_lp)
    errors["bf16_ent"] = _max_err(ent, ref_ent)
    errors["bf16_dtype_is_fp32"] = 0.0 if lp.dtype == torch.float32 else 1.0
    ref_shard = ref_grad[..., rank * part:(rank + 1) * part]
    errors["bf16_grad"] = _max_err(grad.float(), ref_shard.bfloat16().float())
    return errors


def _dp_checks(rank: int, world: int) -> dict[str, float]:
    import torch.distributed as dist

    from sfpo_megatron.algorithms.losses import PolicyLossConfig, mini_batch_denominators, policy_loss
    from sfpo_megatron.algorithms.vcpo import effective_sample_size, importance_weight_stats

    group = dist.new_group(list(range(world)))  # the "DP" group of this test: both ranks
    out: dict[str, float] = {}
    g = torch.Generator().manual_seed(5)
    Bt, T, H, Vv = 8, 6, 4, 7
    x = torch.randn(Bt, T, H, generator=g, dtype=torch.float64)
    target = torch.randint(0, Vv, (Bt, T), generator=g)
    lengths = torch.tensor([6, 2, 0, 5, 1, 6, 3, 4])
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).long()
    old = torch.randn(Bt, T, generator=g, dtype=torch.float64) * 0.2 - 2.0
    adv = torch.randn(Bt, generator=g, dtype=torch.float64)
    w0 = torch.randn(H, Vv, generator=g, dtype=torch.float64)

    def grad_of(sl, mode, den):
        w = w0.clone().requires_grad_(True)
        log_p = torch.log_softmax(x[sl] @ w, dim=-1)
        lp = log_p.gather(-1, target[sl].unsqueeze(-1)).squeeze(-1)
        ent = -(log_p.exp() * log_p).sum(-1)
        cfg = PolicyLossConfig(eps_clip=0.2, clip_ratio_c=3.0, loss_agg_mode=mode, entropy_coeff=0.01)
        loss, _ = policy_loss(lp, old[sl], adv[sl], mask[sl], cfg, entropy=ent, denominators=den)
        (gw,) = torch.autograd.grad(loss, w)
        return loss.detach(), gw

    half = Bt // world
    mine = slice(rank * half, (rank + 1) * half)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        full_loss, full_grad = grad_of(slice(None), mode, None)
        den = mini_batch_denominators(mask[mine], loss_scale_factor=T, group=group)
        loss, gw = grad_of(mine, mode, den)
        both = torch.cat([loss.reshape(1), gw.reshape(-1)])
        dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
        out[f"dp_loss_{mode}"] = abs(float(both[0]) - float(full_loss))
        out[f"dp_grad_{mode}"] = _max_err(both[1:].reshape_as(full_grad), full_grad)

    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)[rank]
    ess = effective_sample_size(torch.log(w), group=group)
    out["ess_err"] = abs(ess.ess - 100.0 / 30.0)
    out["ess_num_samples"] = float(ess.num_samples)
    out["rho_err"] = abs(ess.rho - 100.0 / 120.0)
    varlen = torch.tensor([1.0, 2.0, 3.0]) if rank == 0 else torch.tensor([4.0])
    stats = importance_weight_stats(torch.log(varlen), group=group)
    out["stats_max"] = stats["is_weight/max"]
    out["stats_p50"] = stats["is_weight/p50"]
    out["stats_mean"] = stats["is_weight/mean"]
    return out


def _worker(out_path: str) -> None:
    import torch.distributed as dist

    from sfpo_megatron.distributed import parallel
    from sfpo_megatron.distributed.platform import setup_platform

    setup_platform()
    env = parallel.initialize(tp=TP, pp=1, seed=1)
    results = {"tp": _tp_checks(env.rank), "dp": _dp_checks(env.rank, env.world_size)}
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, results)
    if env.rank == 0:
        Path(out_path).write_text(json.dumps(gathered))
    parallel.destroy()


# ------------------------------------------------------------------------------------------
# pytest side
# ------------------------------------------------------------------------------------------
def test_tp2_and_dp2_match_single_rank(tmp_path):
    out = tmp_path / "results.json"
    torchrun(2, [str(Path(__file__).resolve()), str(out)])
    ranks = json.loads(out.read_text())
    assert len(ranks) == 2
    for rank, res in enumerate(ranks):
        for key, err in res["tp"].items():
            tol = 1e-12 if ("float64" in key or key.startswith("padded")) else 1e-6
            if key.startswith("bf16"):
                tol = 1e-6 if key != "bf16_grad" else 1e-2  # grad is rounded to bf16 on the way back
            assert err <= tol, f"rank {rank} {key}: {err} > {tol}"
        dp = res["dp"]
        for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
            assert dp[f"dp_loss_{mode}"] < 1e-13, (rank, mode, dp)
            assert dp[f"dp_grad_{mode}"] < 1e-13, (rank, mode, dp)
        assert dp["ess_err"] < 1e-12 and dp["rho_err"] < 1e-12 and dp["ess_num_samples"] == 4
        assert dp["stats_max"] == pytest.approx(4.0) and dp["stats_p50"] == pytest.approx(2.5)
        assert dp["stats_mean"] == pytest.approx(2.5)


def test_single_rank_matches_full_vocab_and_checks_inputs():
    full, target, c_lp, c_ent = _case(torch.float64, seed=21)
    ref_lp, ref_ent, ref_grad = _reference(full, target, c_lp, c_ent, 0.6)
    x = full.clone().requires_grad_(True)
    lp, ent = vocab_parallel_logprobs_and_entropy(x, target, temperature=0.6)
    (grad,) = torch.autograd.grad((c_lp * lp + c_ent * ent).sum(), x)
    assert _max_err(lp, ref_lp) < 1e-12 and _max_err(ent, ref_ent) < 1e-12
    assert _max_err(grad, ref_grad) < 1e-12
    # Only one of the two outputs in the loss (the other's gradient arrives as None).
    for c1, c2 in ((c_lp, torch.zeros_like(c_ent)), (torch.zeros_like(c_lp), c_ent)):
        _, _, ref_g = _reference(full, target, c1, c2, 0.6)
        x = full.clone().requires_grad_(True)
        lp, ent = vocab_parallel_logprobs_and_entropy(x, target, temperature=0.6)
        used = (c1 * lp).sum() if c2.abs().sum() == 0 else (c2 * ent).sum()
        (grad,) = torch.autograd.grad(used, x)
        assert _max_err(grad, ref_g) < 1e-12
    # entropy of a uniform distribution is log V, whatever the temperature
    _, ent_u = vocab_parallel_logprobs_and_entropy(torch.zeros(2, V), torch.zeros(2, dtype=torch.long),
                                                   temperature=0.3)
    assert ent_u.tolist() == pytest.approx([math.log(V)] * 2)
    with pytest.raises(VocabParallelError, match="temperature must be > 0, got 0"):
        vocab_parallel_logprobs_and_entropy(x, target, temperature=0)
    with pytest.raises(VocabParallelError, match=r"target ids must be in \[0, 16\), got min 16 / max 16"):
        vocab_parallel_logprobs_and_entropy(x, torch.full((S, B), 16), temperature=1.0)
    with pytest.raises(VocabParallelError, match=r"share the leading dims"):
        vocab_parallel_logprobs_and_entropy(x, target[:, :2])
    with pytest.raises(VocabParallelError, match=r"vocab_size 17 must be in \(0, 16\]"):
        vocab_parallel_logprobs_and_entropy(x, target, vocab_size=17)


if __name__ == "__main__":
    _worker(sys.argv[1])
