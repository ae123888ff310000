"""SFPO updates of a tiny Qwen3-MoE (8 experts, top-2) on megatron-core's MoE layers.

One real ``torchrun --nproc_per_node 2`` (gloo) launch of tests/scripts/moe_worker.py runs two
SFPO steps (K = 2 fast passes, reposition α = 0.8, slow pass) with the distributed optimizer at
EP=1 (experts data-parallel), at EP=2 (each rank holds 4 experts; the expert parameters' fp32
main-param shards live in their own optimizer; alltoall and allgather dispatchers), on the same
rollout batches. The whole parameter
vector after the updates, experts gathered over the expert-parallel group, agrees (relative error
< 1e-5); and with ``--moe-aux-loss-coeff 0`` EP=1 equals a plain-PyTorch reference of SFPO
(tests/reference_sfpo.py) on the HF model, which has no auxiliary loss in training.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from launch import SCRIPTS, load_module, torchrun
from tiny_models import TRAINER_VOCAB, save_moe_model

sfpo_common = load_module(SCRIPTS / "sfpo_common.py")
SETTINGS = sfpo_common.SETTINGS
WORKER = str(SCRIPTS / "moe_worker.py")
SCENARIOS = ["ep1", "ep2", "ep2_allgather", "ep1_noaux"]
REL = 1e-5


pytestmark = pytest.mark.slow  # one 2-process launch, ~20 s


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("moe_sfpo")
    hf = save_moe_model(root / "hf", **TRAINER_VOCAB)
    out = root / "out"
    out.mkdir()
    torchrun(2, [WORKER, "--hf", str(hf), "--out", str(out), "--scenarios", ",".join(SCENARIOS)],
             timeout=400)
    results = {name: torch.load(out / f"{name}.pt") for name in SCENARIOS}
    results["hf"] = hf
    return results


def _vector(params: dict) -> torch.Tensor:
    return torch.cat([params[n].flatten() for n in sorted(params)]).double()


def _rel(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    va, vb = _vector(a), _vector(b)
    return ((va - vb).norm() / vb.norm()).item()


@pytest.mark.parametrize("name", ["ep1", "ep2"])
def test_refit_path_pushes_every_expert_as_trained(runs, name):
    """The refit's tensors (each stage's leader; at EP=2 half the experts come from the other
    rank) are the trained parameters bit for bit, every expert once: the server loads the
    same weights at EP=2 as at EP=1 (which agree to REL, above)."""
    refit, params = runs[name]["refit"], runs[name]["params"]
    assert sorted(refit) == sorted(params)
    assert sum(".mlp.experts." in n for n in refit) == 8 * 3 * 2  # experts x projections x layers
    for n, t in params.items():
        assert torch.equal(refit[n], t), n
    assert _rel(runs["ep2"]["refit"], runs["ep1"]["refit"]) < REL


@pytest.mark.flags("--expert-model-parallel-size", "--moe-token-dispatcher-type")
@pytest.mark.parametrize("name", ["ep2", "ep2_allgather"])
def test_sfpo_at_ep2_equals_ep1(runs, name):
    assert runs[name]["dispatcher"] == ("allgather" if name.endswith("allgather") else "alltoall")
    assert _rel(runs[name]["params"], runs["ep1"]["params"]) < REL
    initial = _vector(_hf_params(runs["hf"]))
    moved = (_vector(runs[name]["params"]) - initial).norm().item()
    assert moved > 1e-3  # the updates moved the parameters, experts included
    for m, r in zip(runs[name]["metrics"], runs["ep1"]["metrics"]):
        assert m["sfpo/alpha"] == 0.8
        assert abs(m["actor/grad_norm"] - r["actor/grad_norm"]) <= REL * r["actor/grad_norm"]


def _hf_params(hf: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(hf / "model.safetensors")


def test_every_expert_trains(runs):
    initial = _hf_params(runs["hf"])
    moved = {n for n, t in runs["ep2"]["params"].items() if not torch.equal(t, initial[n])}
    experts = [n for n in initial if ".mlp.experts." in n]
    assert len(experts) == 2 * 8 * 3
    assert set(experts) <= moved


@pytest.mark.flags("--moe-aux-loss-coeff")
def test_aux_loss_coeff_flag(runs):
    assert runs["ep1"]["aux_coeff"] == 0.01  # the HF config's router_aux_loss_coef
    assert runs["ep1_noaux"]["aux_coeff"] == 0.0
    # the auxiliary loss adds gradient to the routers: the runs differ
    assert _rel(runs["ep1_noaux"]["params"], runs["ep1"]["params"]) > 1e-6


def _per_expert(params: dict) -> dict:
    """HF's in-memory fused experts (``experts.gate_up_proj`` [E, 2F, H], ``experts.down_proj``
    [E, H, F]) under the checkpoint's per-expert names."""
    out = {}
    for name, t in params.items():
        if name.endswith("experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for x, w in enumerate(t):
                gate, up = w.chunk(2)
                out[f"{prefix}{x}.gate_proj.weight"], out[f"{prefix}{x}.up_proj.weight"] = gate, up
        elif name.endswith("experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for x, w in enumerate(t):
                out[f"{prefix}{x}.down_proj.weight"] = w
        else:
            out[name] = t
    return out


def test_sfpo_without_aux_loss_matches_the_reference(runs):
    from test_sfpo_update import assert_same_params, reference

    ref = reference(runs["hf"], 0.8, 2, 2)
    ref = dict(ref, params=_per_expert(ref["params"]), init=_per_expert(ref["init"]))
    assert_same_params(runs["ep1_noaux"]["params"], ref, "ep1_noaux")
    assert sorted(runs["ep1_noaux"]["params"]) == sorted(ref["params"])


def test_router_metrics_every_step(runs):
    """Load balance (busiest expert over the mean) and aux loss are logged at every step, the same
    at EP=1 and EP=2 (the routers see the same tokens); no aux loss when its coefficient is 0."""
    for name in ("ep1", "ep2", "ep1_noaux"):
        assert len(runs[name]["metrics"]) == 2
        for m in runs[name]["metrics"]:
            ratio = m["moe/tokens_per_expert_max_over_mean"]
            assert 1.0 < ratio <= 8 / 2, (name, ratio)  # top-2 of 8: at most 4x the mean
            assert m["moe/tokens_per_expert_max_over_mean_layer_avg"] <= ratio
            assert ("moe/aux_loss" in m) == (name != "ep1_noaux")
    for m1, m2 in zip(runs["ep1"]["metrics"], runs["ep2"]["metrics"]):
        assert m2["moe/tokens_per_expert_max_over_mean"] == m1["moe/tokens_per_expert_max_over_mean"]
        # the switch loss num_experts * Σ f_e P_e is 1 for a uniform router, here close to it
        assert 0.9 < m1["moe/aux_loss"] < 2.0
        assert abs(m2["moe/aux_loss"] - m1["moe/aux_loss"]) < 1e-5 * m1["moe/aux_loss"]
