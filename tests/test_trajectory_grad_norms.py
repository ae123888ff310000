"""Per-trajectory squared policy-gradient norms (sfpo_megatron/trainer/trajectory_grad_norms.py) for
VCPO's optimal baseline, against brute-force autograd on the HF model with the same weights.

Two real launches of tests/scripts/grad_norm_worker.py (gloo): one process (DP=1) and ``torchrun
--nproc_per_node 2`` (DP=2 with the distributed optimizer, plain and with overlapped grad reduce /
param gather; TP=2 on Llama and on Qwen3, whose q/k layernorm grads are partial per TP rank;
PP=2 with tied embeddings; interleaved PP=2 x VPP=2). Reference: for each row separately,
autograd of Σ_t log softmax(logits / T)[y_t] over its response positions in fp32 HF
transformers; the squared norm over all HF parameters (tied embedding once) for the exact mode,
over the logits for the logit mode.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import transformers
from launch import PYTHON, SCRIPTS, load_module, run, torchrun
from tiny_models import save_sfpo_model

from sfpo_megatron.algorithms.vcpo import opob_advantages
from sfpo_megatron.trainer.trajectory_grad_norms import (
    TrajectoryGradNormError,
    logit_grad_sq_norms,
    trajectory_grad_sq_norms,
)
from sfpo_megatron.trainer.vocab_parallel import vocab_parallel_logit_grad_sq

sfpo_common = load_module(SCRIPTS / "sfpo_common.py")
norm_batch = sfpo_common.norm_batch

WORKER = str(SCRIPTS / "grad_norm_worker.py")
SINGLE = ["dp1"]
DUAL = ["dp2", "dp2_overlap", "tp2", "tp2_qwen3", "pp2", "vpp2"]
MODEL = {"tp2_qwen3": "_qwen3", "vpp2": "_4layers"}  # scenario → model directory suffix
TEMP = float(sfpo_common.SETTINGS["--rollout-temperature"])
RTOL = 1e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("grad_norms")
    hf = save_sfpo_model(root / "hf")
    save_sfpo_model(root / "hf_4layers", num_hidden_layers=4)
    save_sfpo_model(root / "hf_qwen3", "qwen3", seed=1, head_dim=16)  # q/k RMS norms
    out = root / "out"
    out.mkdir()
    common = ["--hf", str(hf), "--out", str(out)]
    run([PYTHON, WORKER, *common, "--scenarios", ",".join(SINGLE)], timeout=300)
    torchrun(2, [WORKER, *common, "--scenarios", ",".join(DUAL)], timeout=300)
    results = {name: torch.load(out / f"{name}.pt") for name in SINGLE + DUAL}
    results["hf"] = hf
    return results


@lru_cache(maxsize=None)
def brute_force(hf: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖∇θ log π(τ_i)‖², ‖∂ log π(τ_i) / ∂logits‖²) per row, one autograd pass per row."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    params = list(model.parameters())  # a tied weight appears once
    batch = norm_batch()
    exact, logit = [], []
    for i in range(batch.size):
        logits = model(batch.tokens[i:i + 1]).logits
        logits.retain_grad()
        logp = torch.log_softmax(logits[0] / TEMP, dim=-1)
        logp = logp.gather(-1, batch.labels[i].unsqueeze(-1)).squeeze(-1)
        (logp * batch.loss_mask[i]).sum().backward()
        exact.append(sum(float(p.grad.double().square().sum()) for p in params
                         if p.grad is not None))
        logit.append(float(logits.grad.double().square().sum()))
        model.zero_grad(set_to_none=True)
    return torch.tensor(exact, dtype=torch.float64), torch.tensor(logit, dtype=torch.float64)


def assembled(per_rank: list) -> torch.Tensor:
    """The whole batch from (dp_rank, rows) of every rank; every rank of a DP replica (all TP
    ranks and PP stages) must have returned the same float64 CPU values."""
    by_dp: dict[int, list[torch.Tensor]] = {}
    for dp_rank, rows in per_rank:
        assert rows.dtype == torch.float64 and rows.device.type == "cpu"
        by_dp.setdefault(dp_rank, []).append(rows)
    for dp_rank, copies in by_dp.items():
        assert all(torch.equal(c, copies[0]) for c in copies), f"DP rank {dp_rank} ranks differ"
    return torch.cat([by_dp[d][0] for d in sorted(by_dp)])


def model_dir(runs: dict, name: str) -> Path:
    return Path(str(runs["hf"]) + MODEL.get(name, ""))


# ---- exact mode ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", SINGLE + DUAL)
def test_exact_matches_autograd(runs, name):
    ref, _ = brute_force(model_dir(runs, name))
    got = assembled(runs[name]["exact"])
    assert got.shape == ref.shape
    assert ref[6] == 0 and got[6] == 0  # the row without response tokens
    lengths = norm_batch().loss_mask.sum(dim=1).tolist()
    assert len(set(lengths)) >= 4 and len(set(ref.tolist())) == ref.numel()
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=0.0)


@pytest.mark.flags("--pipeline-model-parallel-size", "--virtual-pipeline-model-parallel-size")
def test_pipeline_and_interleaved_stages_hold_their_layers(runs):
    """PP=2 over 2 layers: a layer per stage. PP=2 x VPP=2 over 4 layers: two chunks per stage,
    interleaved (stage 0 runs layers 1 and 3), as megatron's interleaved schedule lays them out."""
    assert [c["chunk_layers"] for c in runs["pp2"]["checks"]] == [[[1]], [[2]]]
    assert [c["chunk_layers"] for c in runs["vpp2"]["checks"]] == [[[1], [3]], [[2], [4]]]


@pytest.mark.parametrize("name", SINGLE + DUAL)
def test_exact_leaves_no_state_behind(runs, name):
    for rank, checks in enumerate(runs[name]["checks"]):
        assert checks["grads_zero"], f"{name} rank {rank}: gradients not zero after the call"
        assert checks["params_unchanged"], f"{name} rank {rank}: parameters changed"
        assert checks["config_restored"], f"{name} rank {rank}: model config not restored"
    dp2 = [c["shape"] for c in runs["dp2"]["checks"]]
    assert dp2 == [(4,), (4,)]  # each DP rank returns only its own rows


@pytest.mark.parametrize("name", sorted(sfpo_common.STEP_CHECK))
def test_following_update_unaffected(runs, name):
    # A GRPO update after the call equals, bit for bit, the same update on a fresh setup.
    assert runs[name]["step_after_call_equal"] is True


# ---- logit mode ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(sfpo_common.LOGIT))
def test_logit_matches_autograd(runs, name):
    _, ref = brute_force(model_dir(runs, name))
    torch.testing.assert_close(assembled(runs[name]["logit"]), ref, rtol=RTOL, atol=0.0)


def test_vocab_parallel_logit_grad_sq_single_rank():
    """Closed form vs autograd per token (fp64, padded vocab columns dropped), and no
    cancellation in fp32 where p(y) → 1."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 24, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, 20, (3, 4), generator=g)
    got = vocab_parallel_logit_grad_sq(logits, target, 0.7, 20)
    ref = torch.empty(3, 4, dtype=torch.float64)
    for b in range(3):
        for s in range(4):
            z = logits[b, s, :20].clone().requires_grad_(True)
            torch.log_softmax(z / 0.7, -1)[target[b, s]].backward()
            ref[b, s] = z.grad.square().sum()
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0.0)

    # 1 − p(y) ≈ 6e-6: 1 − 2p + Σp² in fp32 is rounding noise there; the closed form is not.
    sharp = torch.zeros(1, 1, 8, dtype=torch.float32)
    sharp[..., 3] = 7.0
    tgt = torch.tensor([[3]])
    z64 = sharp.double() / 0.5
    p = torch.softmax(z64, -1)[0, 0]
    exact = ((1 - p[3]) ** 2 + p[torch.arange(8) != 3].square().sum()) / 0.25
    got32 = vocab_parallel_logit_grad_sq(sharp, tgt, temperature=0.5)
    assert got32.dtype == torch.float32
    assert math.isclose(float(got32), float(exact), rel_tol=1e-5)
    p32 = torch.softmax(sharp[0, 0] / 0.5, -1)
    naive = (1 - 2 * p32[3] + p32.square().sum()) / 0.25
    assert not math.isclose(float(naive), float(exact), rel_tol=0.5)


# ---- end to end: VCPO's optimal baseline -----------------------------------------------------


def test_opob_advantages_from_exact_norms(runs):
    ref_g2, _ = brute_force(runs["hf"])
    g2 = assembled(runs["dp2"]["exact"])
    batch = norm_batch()
    rewards = [1.0, 0.0, 1.0, 0.5, 0.0, 1.0, 1.0, 0.25]
    log_w = [0.3, -0.5, 1.2, 0.0, -1.0, 0.7, 0.2, -0.2]
    weights = torch.tensor(log_w, dtype=torch.float64).exp()
    groups = batch.group_ids.tolist()
    adv = opob_advantages(torch.tensor(rewards), weights, g2, batch.group_ids)

    # By hand from the HF norms: b*_g = Σ w²‖g‖²R / Σ w²‖g‖², A = (R − b*) / (σ_g + 1e-6).
    expected = []
    for i, gid in enumerate(groups):
        members = [j for j, h in enumerate(groups) if h == gid]
        c = {j: math.exp(2 * log_w[j]) * float(ref_g2[j]) for j in members}
        baseline = sum(c[j] * rewards[j] for j in members) / sum(c.values())
        mean = sum(rewards[j] for j in members) / len(members)
        std = math.sqrt(sum((rewards[j] - mean) ** 2 for j in members) / (len(members) - 1))
        assert abs(baseline - mean) > 1e-2  # the weighting matters for this batch
        expected.append((rewards[i] - baseline) / (std + 1e-6))
    expected_t = torch.tensor(expected, dtype=torch.float64)
    assert expected_t.abs().min() > 1e-2
    torch.testing.assert_close(adv, expected_t, rtol=1e-6, atol=0.0)

    # --opob-grad-norm exact's normalisation, the VCPO reference code's: the same untruncated w²
    # weighting, the population group std (divide by n), no epsilon.
    ref = []
    for i, gid in enumerate(groups):
        members = [j for j, h in enumerate(groups) if h == gid]
        c = {j: math.exp(2 * log_w[j]) * float(ref_g2[j]) for j in members}
        baseline = sum(c[j] * rewards[j] for j in members) / sum(c.values())
        mean = sum(rewards[j] for j in members) / len(members)
        std = math.sqrt(sum((rewards[j] - mean) ** 2 for j in members) / len(members))
        ref.append((rewards[i] - baseline) / std)
    population = opob_advantages(torch.tensor(rewards), weights, g2, batch.group_ids, std="population")
    torch.testing.assert_close(population, torch.tensor(ref, dtype=torch.float64), rtol=1e-6, atol=0.0)
    assert (population - adv).abs().max() > 1e-2  # the two normalisations differ on this batch


# ---- bad input -------------------------------------------------------------------------------


def test_bad_settings_name_the_value():
    batch = norm_batch()
    with pytest.raises(TrajectoryGradNormError, match=r"temperature must be > 0, got 0\.0"):
        logit_grad_sq_norms([], batch, micro_batch_size=1, temperature=0.0, vocab_size=256)
    with pytest.raises(TrajectoryGradNormError, match=r"vocab_size must be >= 1, got 0"):
        trajectory_grad_sq_norms(None, batch, temperature=1.0, vocab_size=0)
    assert issubclass(TrajectoryGradNormError, ValueError)
