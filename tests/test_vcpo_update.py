"""The VCPO update on megatron, on synthetic batches.

* with w ≡ 1 (rollout log-probs = the trainer's own), ``--vcpo`` changes nothing: two SFPO
  updates end at the same parameters bit for bit as without it;
* with known log-weights δ_i, the logged ESS, ρ and LR scale equal the closed form
  (Σw)²/Σw², ESS/B and sqrt(min(1, ρ/ρ_base)), and the step really used lr·scale: its parameters
  equal, bit for bit, those of the same update run at that learning rate without scaling — in
  one process and with DP=2 (ESS over the mini-batch of both ranks, distributed optimizer);
  the LR is restored after the step;
* OPOB in the update (exact per-trajectory gradient norms, whose equality with brute-force
  per-trajectory gradients tests/test_trajectory_grad_norms.py proves): the advantages it
  recomputes move the update, identically at DP1 and DP2 (prompt groups straddle the DP shards,
  so a wrong gather or row assignment would show).
"""

from __future__ import annotations

import math

import pytest
import torch
from launch import PYTHON, SCRIPTS, load_module, run, torchrun
from tiny_models import save_sfpo_model

sfpo_common = load_module(SCRIPTS / "sfpo_common.py")
SETTINGS, DELTAS, closed_form = sfpo_common.SETTINGS, sfpo_common.DELTAS, sfpo_common.closed_form

WORKER = str(SCRIPTS / "vcpo_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("vcpo")
    hf = save_sfpo_model(root / "hf")
    out = root / "out"
    out.mkdir()
    common = ["--hf", str(hf), "--out", str(out)]
    run([PYTHON, WORKER, *common, "--scenarios", "onpolicy,known_w,opob"], timeout=400)
    torchrun(2, [WORKER, *common, "--scenarios", "known_w_dp2,opob_dp2"], timeout=400)
    return {n: torch.load(out / f"{n}.pt") for n in ("onpolicy", "known_w", "known_w_dp2", "opob", "opob_dp2")}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_on_policy_vcpo_is_the_synchronous_update_bit_for_bit(results: dict) -> None:
    r = results["onpolicy"]
    assert _equal(r["plain"], r["vcpo"])
    for m in r["vcpo_metrics"]:
        assert m["vcpo/ess"] == 8.0 and m["vcpo/rho"] == 1.0 and m["vcpo/lr_scale"] == 1.0
        assert m["is_weight/max"] == m["is_weight/min"] == 1.0
        assert m["lr_effective"] == m["lr"]
        assert m["sfpo/fast_displacement_norm"] > 0  # SFPO ran its fast passes
    # The update moved the parameters (the equality is not of two untouched models).
    assert r["plain_metrics"][0]["actor/grad_norm"] > 0


@pytest.mark.flags("--vcpo", "--ess-lr-scaling", "--ess-rho-base")
@pytest.mark.parametrize("name", ["known_w", "known_w_dp2"])
def test_ess_and_lr_scale_are_exact_for_known_weights(results: dict, name: str) -> None:
    r = results[name]
    cf = closed_form(DELTAS)
    assert cf["scale"] < 0.95  # the weights are far enough from 1 for the scaling to matter
    m = r["scaled_metrics"]
    assert m["vcpo/ess"] == pytest.approx(cf["ess"], rel=1e-6)
    assert m["vcpo/rho"] == pytest.approx(cf["rho"], rel=1e-6)
    assert m["vcpo/lr_scale"] == pytest.approx(cf["scale"], rel=1e-6)
    assert m["lr_effective"] == pytest.approx(m["lr"] * cf["scale"], rel=1e-6)
    assert m["is_weight/max"] == pytest.approx(math.exp(max(DELTAS)), rel=1e-5)
    assert m["is_weight/min"] == pytest.approx(math.exp(min(DELTAS)), rel=1e-5)
    assert r["manual_metrics"]["vcpo/lr_scale"] == 1.0
    # The optimizer step used lr · scale: bitwise the parameters of a run at that LR.
    assert _equal(r["scaled"], r["manual"])
    # ... and the scheduler's LR is back to its base value after the step.
    assert set(r["scaled_lr_after"]) == {float(SETTINGS["--lr"])}


@pytest.mark.flags("--tis-threshold")
@pytest.mark.parametrize("name", ["known_w", "known_w_dp2"])
def test_tis_threshold_sets_which_weights_are_truncated(results: dict, name: str) -> None:
    r = results[name]
    frac = {label: sum(d > math.log(c) for d in DELTAS) / len(DELTAS)
            for label, c in (("scaled", 8.0), ("tis_low", 1.2))}
    assert frac == {"scaled": 1 / 8, "tis_low": 3 / 8}
    for label in frac:
        assert r[f"{label}_metrics"]["is_weight/truncated_frac"] == frac[label]
    # Same weights and LR scale, another truncation: another loss and gradient. (Not other
    # parameters to the bit: Adam's first step is lr · g / (|g| + eps), about lr · sign(g).)
    low, default = r["tis_low_metrics"], r["scaled_metrics"]
    assert low["vcpo/lr_scale"] == default["vcpo/lr_scale"]
    assert low["actor/pg_loss"] != default["actor/pg_loss"]
    assert low["actor/grad_norm"] < default["actor/grad_norm"]


def _rel(a: dict, b: dict) -> float:
    va = torch.cat([a[k].reshape(-1) for k in sorted(a)])
    vb = torch.cat([b[k].reshape(-1) for k in sorted(b)])
    return float((va - vb).norm() / vb.norm())


@pytest.mark.flags("--off-policy-baseline", "--opob-grad-norm")
def test_opob_changes_the_update_identically_at_dp1_and_dp2(results: dict) -> None:
    one, two = results["opob"], results["opob_dp2"]
    shift = one["opob_metrics"]["vcpo/opob_advantage_shift"]
    assert shift > 1e-3  # unequal weights and gradient norms move b* off the group mean
    assert two["opob_metrics"]["vcpo/opob_advantage_shift"] == pytest.approx(shift, rel=1e-5)
    assert one["opob_metrics"]["time/opob_grad_norm_s"] > 0
    # The advantages the update used are OPOB's from the standalone norms: exact norms (one
    # backward per trajectory) and logit norms (folded into the old-log-prob forward).
    for r in (one, two):
        for label in ("opob", "opob_logit"):
            assert r[f"{label}_metrics"]["vcpo/opob_advantage_shift"] == pytest.approx(
                r[f"{label}_expected_shift"], rel=1e-5), label
    assert one["opob_logit_metrics"]["vcpo/opob_advantage_shift"] > 1e-3
    assert _rel(one["opob"], one["plain"]) > 1e-4  # OPOB's advantages changed the step
    assert _rel(two["opob"], one["opob"]) < 1e-5  # DP2 = DP1
    assert _rel(two["plain"], one["plain"]) < 1e-5
