"""Packed token-budget micro-batches (--use-dynamic-batch-size) give the same SFPO update as
padded ones, on a batch with long-tailed response lengths and mixed prompt lengths (most of the
padded layout is padding).

Real launches of tests/scripts/packing_worker.py (gloo): one process (DP=1) and ``torchrun
--nproc_per_node 2`` (DP=2 with the distributed optimizer; TP=2 and PP=2 in the slow tier, where
each packed micro-batch is padded to the budget). Compared, packed against padded: the old
log-probs and entropies at θ0 of the whole batch, every pass's summed micro-batch losses per
mini-batch, and the parameters after 2 SFPO steps (also with VCPO's OPOB baseline, whose
"logit" gradient norms come from the packed old-log-prob forward) (K = 2, α = 0.8, 2 mini-batches per pass),
all to a relative error below 1e-6 in fp32.
"""

from __future__ import annotations

import pytest
import torch
from launch import PYTHON, SCRIPTS, run, torchrun
from tiny_models import save_sfpo_model

WORKER = str(SCRIPTS / "packing_worker.py")
REL = 1e-6


def launch(tmp_path_factory, nproc: int, scenarios: list[str]) -> dict:
    root = tmp_path_factory.mktemp("packing")
    hf = save_sfpo_model(root / "hf")
    out = root / "out"
    out.mkdir()
    args = [WORKER, "--hf", str(hf), "--out", str(out), "--scenarios", ",".join(scenarios)]
    if nproc == 1:
        run([PYTHON, *args], timeout=400)
    else:
        torchrun(nproc, args, timeout=400)
    return {name: torch.load(out / f"{name}.pt") for name in scenarios}


@pytest.fixture(scope="module")
def dp1(tmp_path_factory) -> dict:
    return launch(tmp_path_factory, 1, ["padded_dp1", "packed_dp1", "padded_opob", "packed_opob"])


@pytest.fixture(scope="module")
def dp2(tmp_path_factory) -> dict:
    return launch(tmp_path_factory, 2, ["padded_dp2", "packed_dp2"])


@pytest.fixture(scope="module")
def model_parallel(tmp_path_factory) -> dict:
    return launch(tmp_path_factory, 2, ["packed_tp2", "packed_pp2"])


@pytest.fixture(scope="module")
def context_parallel(tmp_path_factory) -> dict:
    return launch(tmp_path_factory, 2, ["packed_cp2", "packed_cp2opob"])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def flat(params: dict) -> torch.Tensor:
    return torch.cat([params[n].flatten() for n in sorted(params)]).double()


def assert_same_update(packed: dict, padded: dict, what: str) -> None:
    t0p, t0 = packed["theta0"], padded["theta0"]
    mask = t0["loss_mask"]
    assert torch.equal(t0p["loss_mask"], mask)
    for key in ("logprobs", "entropy"):
        assert rel(t0p[key][mask], t0[key][mask]) < REL, f"{what}: {key} at θ0"
        assert not t0p[key][~mask].any(), f"{what}: {key} set off the response tokens"
    # The loss of every micro-batch, summed per optimizer step, for every pass of both steps.
    losses = [torch.tensor([r["loss"] for name in passes for r in passes[name]])
              for passes in (p for run in (packed, padded) for p in run["passes"])]
    half = len(losses) // 2
    assert rel(torch.cat(losses[:half]), torch.cat(losses[half:])) < REL, f"{what}: losses"
    a, b, b0 = flat(packed["params"]), flat(padded["params"]), flat(padded["init"])
    moved = (b - b0).norm().item()
    assert moved > 1e-2, f"{what}: the update did not move the parameters"
    assert rel(a, b) < REL, f"{what}: parameters after 2 SFPO steps ({rel(a, b):.3g})"
    # Stricter, relative to how far training moved them.
    assert (a - b).norm().item() / moved < 1e-5, f"{what}: parameters vs their displacement"
    for mp, m in zip(packed["metrics"], padded["metrics"]):
        assert mp["batch/real_tokens"] == m["batch/real_tokens"]
        for key in ("sfpo/entropy", "actor/entropy_at_theta0", "sfpo/fast_displacement_norm"):
            assert mp[key] == pytest.approx(m[key], rel=REL), f"{what}: {key}"


@pytest.mark.flags("--use-dynamic-batch-size", "--max-tokens-per-gpu")
def test_packed_equals_padded_dp1(dp1):
    packed, padded = dp1["packed_dp1"], dp1["padded_dp1"]
    assert_same_update(packed, padded, "dp1")
    for mp, m in zip(packed["metrics"], padded["metrics"]):
        assert m["batch/padding_fraction"] > 0.6  # the padded layout is mostly padding
        assert mp["batch/padding_fraction"] == 0.0 and mp["batch/padding_tokens"] == 0.0
        # 2 mini-batches of 8 samples: 4 padded micro-batches of 2 rows each, fewer packed.
        assert m["batch/micro_batches_per_rank"] == 8.0
        assert mp["batch/micro_batches_per_rank"] < 8.0


@pytest.mark.flags("--use-dynamic-batch-size", "--off-policy-baseline", "--vcpo")
def test_packed_equals_padded_vcpo_opob(dp1):
    """OPOB's logit gradient norms and the importance weights come from the packed forward."""
    packed, padded = dp1["packed_opob"], dp1["padded_opob"]
    assert_same_update(packed, padded, "opob")
    for mp, m in zip(packed["metrics"], padded["metrics"]):
        assert m["vcpo/opob_advantage_shift"] > 0
        for key in ("vcpo/opob_advantage_shift", "vcpo/ess", "is_weight/log_mean"):
            assert mp[key] == pytest.approx(m[key], rel=REL), key


@pytest.mark.flags("--use-dynamic-batch-size", "--max-tokens-per-gpu", "--use-distributed-optimizer")
def test_packed_equals_padded_dp2_distributed_optimizer(dp2):
    assert_same_update(dp2["packed_dp2"], dp2["padded_dp2"], "dp2")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["packed_tp2", "packed_pp2"])
def test_packed_equals_padded_tp2_pp2(dp1, model_parallel, name):
    assert_same_update(model_parallel[name], dp1["padded_dp1"], name)
    if name == "packed_pp2":  # every micro-batch padded to the budget: fixed p2p shapes
        m = model_parallel[name]["metrics"][0]
        assert m["batch/padding_tokens"] == 100 * m["batch/micro_batches_per_rank"] \
            - m["batch/real_tokens"]


@pytest.mark.flags("--context-parallel-size")
def test_context_parallel_equals_padded(dp1, context_parallel):
    """CP=2: every packed sequence split into megatron's 4 load-balanced chunks over 2 ranks
    (attention over the all-gathered keys / values, log-probs gathered back): the same update."""
    assert_same_update(context_parallel["packed_cp2"], dp1["padded_dp1"], "cp2")
    m = context_parallel["packed_cp2"]["metrics"][0]
    # Each sequence is padded to a multiple of 2 x CP = 4 tokens, inside its own segment.
    assert 0 < m["batch/padding_tokens"] < 4 * 16
    packed, padded = context_parallel["packed_cp2opob"], dp1["padded_opob"]
    assert_same_update(packed, padded, "cp2 opob")
    for mp, mpad in zip(packed["metrics"], padded["metrics"]):
        for key in ("vcpo/opob_advantage_shift", "vcpo/ess"):
            assert mp[key] == pytest.approx(mpad[key], rel=REL), key


@pytest.mark.slow
@pytest.mark.parametrize("name", ["packed_cp2tp2", "packed_cp2dp2"])
def test_context_parallel_with_tp_and_dp(dp1, tmp_path_factory, name):
    got = launch(tmp_path_factory, 4, [name])[name]
    assert_same_update(got, dp1["padded_dp1"], name)
