"""The megatron SFPO / GRPO update equals the plain-PyTorch reference of Algorithm 1
(tests/reference_sfpo.py, torch AdamW on an HF model with the same weights; the reference
imports nothing from the project, its collation of the samples included).

Two real launches of tests/scripts/sfpo_worker.py (gloo): one process (DP=1 scenarios,
checkpoint resume, KL to a reference policy, bf16, error messages) and ``torchrun
--nproc_per_node 2`` (DP=2 with the distributed optimizer — plain with the θ0 snapshot offloaded,
and with overlapped grad reduce / param gather —, TP=2, PP=2, bf16 + distributed optimizer). Both
start from one tiny random HF Llama saved as safetensors; the reference runs here, in the test
process. Parameters are compared as one vector: ‖θ_megatron − θ_ref‖ / ‖θ_ref − θ_init‖
(relative to how far training moved them, stricter than relative to ‖θ‖) and
‖θ_megatron − θ_ref‖ / ‖θ_ref‖, both < 1e-5. ``--ppo-epochs 4`` GRPO equals SFPO with α = 1,
K = 3 (trigger off) bit for bit.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import transformers
from launch import PYTHON, SCRIPTS, load_module, run, torchrun
from reference_sfpo import (
    LossConfig,
    collate,
    group_advantages,
    response_values,
    sfpo_step,
    with_log_probs,
)
from tiny_models import save_sfpo_model

sfpo_common = load_module(SCRIPTS / "sfpo_common.py")
SETTINGS, make_samples = sfpo_common.SETTINGS, sfpo_common.make_samples

WORKER = str(SCRIPTS / "sfpo_worker.py")
SINGLE = ["dp1", "grpo", "alpha0", "k0a1", "grpo_e4", "k3a1", "kl", "resume", "bf16", "errors"]
DUAL = ["dp2", "dp2_entropy_reference", "dp2_overlap", "dp2_grpo", "dp2_k0a1", "tp2", "pp2",
        "bf16_dp2"]
REL = 1e-5
LR, LR_STEPS, WD = float(SETTINGS["--lr"]), int(SETTINGS["--num-rollouts"]), 0.01
TEMP = float(SETTINGS["--rollout-temperature"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sfpo")
    hf = save_sfpo_model(root / "hf")
    out = root / "out"
    out.mkdir()
    common = ["--hf", str(hf), "--out", str(out)]
    run([PYTHON, WORKER, *common, "--scenarios", ",".join(SINGLE)], timeout=400)
    torchrun(2, [WORKER, *common, "--scenarios", ",".join(DUAL)], timeout=400)
    results = {name: torch.load(out / f"{name}.pt") for name in SINGLE + DUAL}
    results["hf"] = hf
    return results


# ---- the plain-PyTorch reference ----------------------------------------------------------------


@lru_cache(maxsize=None)
def reference(hf: Path, alpha: float, inner: int, steps: int, kl_coef: float = 0.0) -> dict:
    """Algorithm 1 with torch AdamW (megatron's groups: no weight decay on 1-D params) and
    megatron's linear LR decay stepped once per rollout batch."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    ref_policy = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(
        [{"params": [p for p in model.parameters() if p.dim() > 1], "weight_decay": WD},
         {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0}],
        lr=LR, betas=(0.9, 0.999), eps=float(SETTINGS["--adam-eps"]), foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / LR_STEPS)
    cfg = LossConfig(eps_clip=float(SETTINGS["--eps-clip"]),
                     entropy_coeff=float(SETTINGS["--entropy-coef"]), kl_coeff=kl_coef,
                     kl_type="low_var_kl")
    out = {"steps": [], "old_logprobs": None}
    for step in range(1, steps + 1):
        samples = make_samples(step)
        batch = with_log_probs(collate(samples, pad_id=0), model, TEMP,
                               ref_model=ref_policy if kl_coef else None)
        if step == 1:
            out["old_logprobs"] = response_values(batch.old_log_probs, samples)
        res = sfpo_step(model, opt, batch, alpha=alpha, inner_steps=inner,
                        num_mini_batches=int(SETTINGS["--num-steps-per-rollout"]),
                        loss_config=cfg, temperature=TEMP, grad_clip=1.0, lr_scheduler=sched)
        slow = res["passes"]["slow"]
        tokens = sum(r["num_tokens"] for r in slow)
        res["entropy"] = sum(r["entropy"] * r["num_tokens"] for r in slow) / tokens
        out["steps"].append(res)
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["init"] = init
    return out


def assert_same_params(meg: dict, ref: dict, what: str) -> None:
    names = sorted(meg)
    assert set(names) <= set(ref["params"]), f"{what}: unexpected names"
    a = torch.cat([meg[n].flatten() for n in names]).double()
    b = torch.cat([ref["params"][n].flatten() for n in names]).double()
    b0 = torch.cat([ref["init"][n].flatten() for n in names]).double()
    moved = (b - b0).norm()
    assert moved > 1e-3, f"{what}: the reference did not move ({moved})"
    rel_moved = ((a - b).norm() / moved).item()
    rel = ((a - b).norm() / b.norm()).item()
    assert rel_moved < REL and rel < REL, f"{what}: relative error {rel_moved:.3g} of the " \
                                          f"displacement, {rel:.3g} of the parameters"


def rel_close(a: float, b: float, what: str, tol: float = REL) -> None:
    assert abs(a - b) <= tol * max(abs(b), 1e-8), f"{what}: {a!r} vs reference {b!r}"


# ---- SFPO equals the reference at every layout ---------------------------------------------------


@pytest.mark.flags("--lr", "--lr-decay-style", "--num-rollouts", "--num-steps-per-rollout",
                   "--sfpo-inner-steps", "--entropy-coef", "--rollout-temperature",
                   "--use-distributed-optimizer")
@pytest.mark.parametrize("name", ["dp1", "dp2", "dp2_overlap", "tp2", "pp2"])
def test_sfpo_matches_reference(runs, name):
    ref = reference(runs["hf"], 0.8, 2, 2)
    res = runs[name]
    assert_same_params(res["params"], ref, name)
    for step, (m, r) in enumerate(zip(res["metrics"], ref["steps"]), start=1):
        assert m["sfpo/alpha"] == 0.8 and m["sfpo/inner_steps"] == 2
        # Global norms over DP shards / TP shards / PP stages match the single-process ones.
        at = f"{name} step {step}"
        rel_close(m["sfpo/fast_displacement_norm"], r["fast_displacement_norm"], f"{at} ‖θK−θ0‖")
        rel_close(m["sfpo/reposition_norm"], r["reposition_norm"], f"{at} ‖θ̃−θ0‖")
        rel_close(m["sfpo/entropy"], r["entropy"], f"{name} step {step} entropy")
        for pass_name, rows in r["passes"].items():
            mean = sum(x["grad_norm"] for x in rows) / len(rows)
            rel_close(m[f"actor/grad_norm/{pass_name}"], mean, f"{name} {pass_name} grad norm",
                      1e-4)
        assert m["lr"] == pytest.approx(LR * (1 - (step - 1) / LR_STEPS), rel=1e-12)
    # Old log-probs at θ(s,0) through the vocab-parallel logits (TP) / last stage (PP).
    torch.testing.assert_close(response_values(res["old_logprobs"], make_samples(1)),
                               ref["old_logprobs"], rtol=1e-5, atol=1e-5)
    snapshot = res["metrics"][0]["sfpo/snapshot_bytes"]
    full = sum(p.numel() for n, p in ref["init"].items()) * 4
    # The θ0 snapshot is one fp32 copy of this rank's main-param shard: half of it at DP=2.
    expected = {"dp1": full, "dp2": full / 2}.get(name)
    if expected is not None:
        assert snapshot == pytest.approx(expected, rel=0.01)


def reference_entropy_series(step: dict, dp: int, micro_batch_size: int) -> float:
    """The SFPO reference code's entropy (verl: each micro-batch's token mean, averaged over the
    pass's micro-batches, DP rank 0's value) of the slow pass: DP rank 0 trains the first 1/dp of
    each mini-batch, in micro-batches of ``micro_batch_size`` rows."""
    means = []
    for mini in step["passes"]["slow"]:
        sums, tokens = mini["seq_entropy_sums"], mini["seq_tokens"]
        shard = len(sums) // dp
        for start in range(0, shard, micro_batch_size):
            n = sum(tokens[start:start + micro_batch_size])
            if n:
                means.append(sum(sums[start:start + micro_batch_size]) / n)
    return sum(means) / len(means)


def global_entropy_series(step: dict) -> float:
    """The token mean over the whole batch of the slow pass."""
    rows = step["passes"]["slow"]
    return (sum(sum(r["seq_entropy_sums"]) for r in rows)
            / sum(sum(r["seq_tokens"]) for r in rows))


@pytest.mark.flags("--sfpo-entropy-source")
@pytest.mark.parametrize(("name", "source", "dp"), [
    ("dp2", "global", 2), ("dp2_entropy_reference", "reference", 2), ("dp1", "global", 1),
    ("tp2", "global", 1), ("pp2", "global", 1)])
def test_entropy_source_feeds_the_trigger_its_series(runs, name, source, dp):
    """Both series are logged every step; the trigger's window holds the one
    --sfpo-entropy-source names. At DP=2 with unequal micro-batches (1 to 10 response tokens
    each) the two differ by far more than the comparison's tolerance (the tiny random model's
    token entropies are all near log 256, so by little in absolute terms), so the check tells
    them apart."""
    ref = reference(runs["hf"], 0.8, 2, 2)
    mbs = int(SETTINGS["--micro-batch-size"])
    res = runs[name]
    expected = {"global": [global_entropy_series(r) for r in ref["steps"]],
                "reference": [reference_entropy_series(r, dp, mbs) for r in ref["steps"]]}
    if dp == 2:
        for g, r in zip(expected["global"], expected["reference"]):
            assert abs(g - r) > 20 * REL * abs(g), (g, r)
    for step, m in enumerate(res["metrics"]):
        at = f"{name} step {step + 1}"
        rel_close(m["sfpo/entropy_global"], expected["global"][step], f"{at} global entropy")
        rel_close(m["sfpo/entropy_reference"], expected["reference"][step], f"{at} reference entropy")
        rel_close(m["sfpo/entropy"], expected[source][step], f"{at} the trigger's entropy")
    assert res["entropy_history"] == [m["sfpo/entropy"] for m in res["metrics"]]
    assert len(res["entropy_history"]) == 2
    if name == "dp2_entropy_reference":  # the trigger did not fire: the same training as dp2
        assert_same_params(res["params"], ref, name)


@pytest.mark.flags("--pipeline-model-parallel-size", "--tensor-model-parallel-size")
def test_pipeline_stage_holds_its_half_of_the_layers(runs):
    layers = json.loads((runs["hf"] / "config.json").read_text())["num_hidden_layers"]
    assert layers % 2 == 0 and layers >= 2
    assert runs["pp2"]["local_layers"] == layers // 2
    assert runs["tp2"]["local_layers"] == runs["dp1"]["local_layers"] == layers


def test_inputs_advantages_are_grpos():
    """The batches both sides train on carry GRPO's group advantages (recomputed here by the
    reference from the rewards)."""
    for step in (1, 2):
        samples = make_samples(step)
        adv = group_advantages([s.reward for s in samples], [s.group_id for s in samples])
        assert [s.advantage for s in samples] == pytest.approx(adv.tolist(), rel=1e-6)
        assert adv.abs().max() > 0


@pytest.mark.flags("--kl-coef")
def test_kl_to_reference_policy_matches_reference(runs):
    ref = reference(runs["hf"], 0.8, 2, 2, kl_coef=0.05)
    assert_same_params(runs["kl"]["params"], ref, "kl")
    assert runs["kl"]["metrics"][1]["actor/kl"] > 0


# ---- special cases: α = 0 and K = 0, α = 1 are the GRPO step -------------------------------------


@pytest.mark.flags("--sfpo-alpha", "--algorithm")
def test_alpha0_and_k0_alpha1_are_exactly_the_grpo_step(runs):
    ref = reference(runs["hf"], 0.0, 0, 1)
    for grpo, others in (("grpo", ("alpha0", "k0a1")), ("dp2_grpo", ("dp2_k0a1",))):
        assert_same_params(runs[grpo]["params"], ref, grpo)
        for other in others:
            for n, t in runs[grpo]["params"].items():
                assert torch.equal(t, runs[other]["params"][n]), f"{other} differs at {n}"
    m = runs["grpo"]["metrics"][0]
    assert m["sfpo/alpha"] == 0.0 and m["sfpo/snapshot_bytes"] == 0.0
    assert set(runs["grpo"]["passes"]) == {"slow"}
    k = runs["k0a1"]["metrics"][0]
    assert k["sfpo/alpha"] == 1.0 and k["sfpo/inner_steps"] == 0.0
    assert k["sfpo/fast_displacement_norm"] == 0.0 and k["sfpo/reposition_norm"] == 0.0
    assert k["sfpo/snapshot_bytes"] > 0  # it did go through snapshot → reposition → all-gather


# ---- --ppo-epochs E: GRPO's control for SFPO's K + 1 passes ---------------------------------------


@pytest.mark.flags("--ppo-epochs")
def test_ppo_epochs_grpo_equals_sfpo_alpha1_k3_bit_for_bit(runs):
    """GRPO with 4 PPO epochs and SFPO with α = 1, K = 3 (trigger off) run the same 4 passes
    against old log-probs at θ(s,0): equal parameters after 2 steps, and both are the reference's
    α = 1, K = 3 schedule."""
    grpo, sfpo = runs["grpo_e4"], runs["k3a1"]
    for n, t in grpo["params"].items():
        assert torch.equal(t, sfpo["params"][n]), f"--ppo-epochs 4 differs from α=1, K=3 at {n}"
    assert_same_params(grpo["params"], reference(runs["hf"], 1.0, 3, 2), "grpo_e4")
    assert list(grpo["passes"]) == ["epoch0", "epoch1", "epoch2", "epoch3"]
    assert list(sfpo["passes"]) == ["fast0", "fast1", "fast2", "slow"]
    for e, k in zip(grpo["passes"], sfpo["passes"]):
        assert [r["grad_norm"] for r in grpo["passes"][e]] == \
            [r["grad_norm"] for r in sfpo["passes"][k]], (e, k)
    # The old log-probs stay those at θ(s,0): only the very first mini-batch sees no drift.
    assert grpo["passes"]["epoch0"][0]["ppo_kl"] == 0.0
    assert all(grpo["passes"][f"epoch{e}"][0]["ppo_kl"] != 0.0 for e in (1, 2, 3))
    for m, s in zip(grpo["metrics"], sfpo["metrics"]):
        assert m["actor/passes"] == s["actor/passes"] == 4.0
        assert m["sfpo/alpha"] == 0.0 and s["sfpo/alpha"] == 1.0
        assert m["actor/grad_norm"] == s["actor/grad_norm"] == m["actor/grad_norm/epoch3"]
        assert m["sfpo/entropy"] == s["sfpo/entropy"]
    assert runs["grpo"]["metrics"][0]["actor/passes"] == 1.0


# ---- bf16: Stage II acts on the fp32 main params -------------------------------------------------


@pytest.mark.flags("--bf16")
@pytest.mark.parametrize("name", ["bf16", "bf16_dp2"])
def test_bf16_reposition_lands_on_fp32_main_params(runs, name):
    checks = runs[name]["checks"]["bf16"]
    assert len(checks) == 2  # one per SFPO step
    for c in checks:
        assert c["elements"] > 0 and c["model_dtype_bf16"]
        assert c["main_is_lerp_of_main"], "θ̃ main params are not lerp(θ0, θK, α) of the fp32 mains"
        assert c["model_is_bf16_of_main"], "bf16 model params are not the rounded fp32 mains"
        assert c["dp_replicas_equal"], "DP ranks hold different models after the all-gather"
        # Interpolating the bf16 copies would give different parameters.
        assert c["naive_bf16_lerp_differs"] > 0 and c["naive_fp32_lerp_of_bf16_differs"] > 0
    # From step 2 on the fp32 mains carry precision the bf16 copies do not have.
    assert checks[1]["main0_differs_from_bf16"] > 0
    assert all(torch.isfinite(t).all() for t in runs[name]["params"].values())


# ---- the controller state survives a checkpoint --------------------------------------------------


@pytest.mark.flags("--sfpo-zscore-window", "--sfpo-zscore-threshold")
def test_trigger_survives_checkpoint_resume(runs):
    res = runs["resume"]
    m1, m2, m3 = res["metrics"]
    assert m1["sfpo/trigger_step"] == -1.0 and m1["sfpo/alpha"] == 0.8
    # window 2, threshold -1e9: the first full window (step 2) fires; α = 0 from step 3 on.
    assert m2["sfpo/trigger_step"] == 2.0 and m2["sfpo/alpha"] == 0.8
    assert m3["sfpo/alpha"] == 0.0 and m3["sfpo/inner_steps"] == 0.0
    state = res["resumed_state"]["controller"]
    assert state["trigger_step"] == 2 and state["last_step"] == 2 and len(state["history"]) == 2
    r3, r4 = res["resumed_metrics"]
    for m in (r3, r4):
        assert m["sfpo/alpha"] == 0.0 and m["sfpo/trigger_step"] == 2.0  # never fires again
    assert r3["sfpo/entropy"] == m3["sfpo/entropy"]
    for n, t in res["params_continued"].items():
        assert torch.equal(t, res["params"][n]), f"resumed step 3 differs at {n}"


@pytest.mark.flags("--no-ppo-clip", "--allow-unclipped-multi-step", "--micro-batch-size")
def test_errors_name_the_problem(runs):
    e = runs["errors"]["errors"]
    assert all(v is not None and v[2] for v in e.values()), e  # all raised ValueError subclasses
    assert "--kl-coef 0.1 needs a reference policy" in e["kl_without_ref"][1]
    assert "calculate_per_token_loss" in e["per_token_loss"][1]
    assert e["batch_7"][1] == ("rollout batch of 7 samples is not divisible by "
                               "--num-steps-per-rollout 2")
    assert e["batch_6"][1] == ("mini-batch of 3 samples (6 / --num-steps-per-rollout 2) is not "
                               "divisible by data-parallel size 1 x --micro-batch-size 2 = 2")
    n = len(make_samples(1)[3].response_ids)
    assert e["logprob_len"][1] == f"sample 3 (prompt 0) has {n} response tokens but {n - 1} " \
                                  "rollout logprobs"
    assert e["step_order"][1] == "update(step=1) after step 1: steps must increase"
    assert e["window"][1] == "window (--sfpo-zscore-window) must be >= 2, got 1"
    assert e["sfpo_epochs"][1].startswith("--ppo-epochs 2 sets GRPO's passes over a rollout "
                                          "batch; --algorithm sfpo makes its own")
    assert e["unclipped"][1].startswith("--no-ppo-clip with 4 optimizer steps per rollout batch "
                                        "(--num-steps-per-rollout 2 x --ppo-epochs 2) has no "
                                        "trust region")
    # --allow-unclipped-multi-step lets the same settings train: 2 epochs, nothing clipped.
    run = runs["errors"]["unclipped_run"]
    assert list(run["passes"]) == ["epoch0", "epoch1"] and run["moved"] > 0
    assert all(r["pg_clipfrac"] == 0.0 for rows in run["passes"].values() for r in rows)
    assert run["passes"]["epoch1"][1]["ppo_kl"] != 0.0
