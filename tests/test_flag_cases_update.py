"""Update flags, each parsed by the real `rl` parser and run through the real megatron update
(tests/scripts/sfpo_worker.py: ``PolicyUpdater`` on a ``build_training_setup`` built from those
args), against the plain-PyTorch reference (tests/reference_sfpo.py) given the flag's meaning:

* the loss flags (``--eps-clip-high``, ``--dual-clip-c``, ``--loss-agg-mode``, ``--no-ppo-clip``)
  and the optimizer flags (Adam betas / eps, ``--weight-decay``, ``--clip-grad``) give the
  reference's parameters for that setting — and measurably not the default setting's, so the flag
  did something and a flag wired to the wrong field fails;
* ``--sfpo-stop-step 1``: SFPO at step 1, GRPO (one pass) from step 2, as the reference;
* ``--recompute-activations``, ``--sfpo-snapshot-offload``: the same parameters bit for bit (the
  θ0 snapshot of the main params in host memory, pinned when they live on a GPU);
* ``--kl-type k3`` is ``low_var_kl`` (verl's alias; tests/test_sfpo_update.py checks low_var_kl
  against the reference): the same parameters bit for bit, and not those without the KL term;
* rl's model / DDP flags: the setup ``build_training_setup`` builds from them; rl's ``--load``
  flags: what ``rl/state.py:init_policy`` restores from an RL checkpoint (step, Adam state, RNG);
* ``--sfpo-zscore-two-sided``: with a window of 2 the z-score is exactly ±1, so a threshold of
  0.5 fires the two-sided trigger at step 2 whatever the entropy did, and the one-sided one only
  if the entropy rose.

One worker process runs every scenario (~10 s); the reference runs here.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
import torch
import transformers
from launch import PYTHON, SCRIPTS, load_module, run
from reference_sfpo import LossConfig, collate, sfpo_step, with_log_probs
from tiny_models import save_sfpo_model

sfpo_common = load_module(SCRIPTS / "sfpo_common.py")
SETTINGS, make_samples = sfpo_common.SETTINGS, sfpo_common.make_samples

SCENARIOS = ["dp1", "eps_high", "dual_clip", "agg_seq", "agg_norm", "no_clip", "recompute", "adam",
             "stop_step", "one_sided", "two_sided", "eps_clip", "kl_k3", "kl_low_var", "offload", "cpu_offload", "rl_arch",
             "rl_init"]
STEPS = 2  # sfpo_worker.STEPS
REL = 1e-5
TEMP = float(SETTINGS["--rollout-temperature"])
DEFAULT_OPT = {"betas": (0.9, 0.999), "eps": float(SETTINGS["--adam-eps"]),
               "weight_decay": float(SETTINGS["--weight-decay"]), "clip": float(SETTINGS["--clip-grad"])}
DEFAULT_LOSS = {"eps_clip": float(SETTINGS["--eps-clip"]), "eps_clip_high": None, "dual_clip_c": None,
                "agg_mode": "token-mean"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("flag_update")
    hf = save_sfpo_model(root / "hf")
    out = root / "out"
    out.mkdir()
    run([PYTHON, str(SCRIPTS / "sfpo_worker.py"), "--hf", str(hf), "--out", str(out),
         "--scenarios", ",".join(SCENARIOS)], timeout=400)
    results = {name: torch.load(out / f"{name}.pt") for name in SCENARIOS}
    results["hf"] = hf
    return results


@lru_cache(maxsize=None)
def reference(hf: Path, loss: tuple = (), opt: tuple = (), alphas: tuple = (0.8, 0.8)) -> dict:
    """The reference's SFPO (K = 2, 2 mini-batches, linear LR decay over --num-rollouts) with
    ``loss`` / ``opt`` overriding DEFAULT_LOSS / DEFAULT_OPT, α per step (0: one GRPO pass)."""
    lc, oc = {**DEFAULT_LOSS, **dict(loss)}, {**DEFAULT_OPT, **dict(opt)}
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr = float(SETTINGS["--lr"])
    optim = torch.optim.AdamW(
        [{"params": [p for p in model.parameters() if p.dim() > 1], "weight_decay": oc["weight_decay"]},
         {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0}],
        lr=lr, betas=oc["betas"], eps=oc["eps"], foreach=False)
    total = int(SETTINGS["--num-rollouts"])
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1 - s / total)
    cfg = LossConfig(eps_clip=lc["eps_clip"], eps_clip_high=lc["eps_clip_high"],
                     dual_clip_c=lc["dual_clip_c"], agg_mode=lc["agg_mode"],
                     entropy_coeff=float(SETTINGS["--entropy-coef"]))
    grad_norms = []
    for step, alpha in enumerate(alphas, start=1):
        batch = with_log_probs(collate(make_samples(step), pad_id=0), model, TEMP)
        res = sfpo_step(model, optim, batch, alpha=alpha,
                        inner_steps=int(SETTINGS["--sfpo-inner-steps"]) if alpha else 0,
                        num_mini_batches=int(SETTINGS["--num-steps-per-rollout"]), loss_config=cfg,
                        temperature=TEMP, grad_clip=oc["clip"], lr_scheduler=sched,
                        loss_scale_factor=float(SETTINGS["--rollout-max-response-len"]))
        grad_norms += [r["grad_norm"] for rows in res["passes"].values() for r in rows]
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "init": init,
            "grad_norms": grad_norms}


def rel_error(params: dict, ref: dict) -> float:
    """‖θ − θ_ref‖ / ‖θ_ref − θ_init‖ over the parameters ``params`` names."""
    names = sorted(params)
    a = torch.cat([params[n].flatten() for n in names]).double()
    b = torch.cat([ref["params"][n].flatten() for n in names]).double()
    b0 = torch.cat([ref["init"][n].flatten() for n in names]).double()
    return ((a - b).norm() / (b - b0).norm()).item()


CASES = {  # scenario → (loss overrides, optimizer overrides)
    "eps_clip": ((("eps_clip", 0.05),), ()),
    "eps_high": ((("eps_clip_high", 5.0),), ()),
    "dual_clip": ((("dual_clip_c", 1.02),), ()),
    "agg_seq": ((("agg_mode", "seq-mean-token-mean"),), ()),
    "agg_norm": ((("agg_mode", "seq-mean-token-sum-norm"),), ()),
    "no_clip": ((("eps_clip", None),), ()),
    "adam": ((), (("betas", (0.5, 0.9)), ("eps", 1e-3), ("weight_decay", 0.3), ("clip", 0.05))),
}


@pytest.mark.flags("--eps-clip", "--eps-clip-high", "--dual-clip-c", "--loss-agg-mode", "--no-ppo-clip",
                   "--adam-beta1", "--adam-beta2", "--adam-eps", "--weight-decay", "--clip-grad")
@pytest.mark.parametrize("name", sorted(CASES))
def test_flag_gives_the_reference_update_of_its_setting(runs, name):
    loss, opt = CASES[name]
    hf = runs["hf"]
    assert rel_error(runs["dp1"]["params"], reference(hf)) < REL  # the default setting agrees
    got = runs[name]["params"]
    assert rel_error(got, reference(hf, loss, opt)) < REL, name
    # The flag changed the update: the default setting's parameters are far off.
    assert rel_error(got, reference(hf)) > 100 * REL, f"{name}: the flag changed nothing"


def test_adam_case_clips_the_gradient(runs):
    """--clip-grad 0.05 binds: the megatron run's grad norms (before clipping) exceed it."""
    norms = [m["actor/grad_norm"] for m in runs["adam"]["metrics"]]
    assert min(norms) > 0.05


@pytest.mark.flags("--sfpo-stop-step")
def test_stop_step_switches_to_grpo_after_it(runs):
    r = runs["stop_step"]
    alphas = [m["sfpo/alpha"] for m in r["metrics"]]
    assert alphas == [0.8, 0.0]
    assert [m["actor/passes"] for m in r["metrics"]] == [3.0, 1.0]
    assert rel_error(r["params"], reference(runs["hf"], alphas=(0.8, 0.0))) < REL


@pytest.mark.flags("--recompute-activations")
def test_recompute_activations_is_bit_equal(runs):
    a, b = runs["recompute"], runs["dp1"]
    assert a["params"].keys() == b["params"].keys()
    for n, t in b["params"].items():
        assert torch.equal(a["params"][n], t), n
    assert [m["actor/grad_norm"] for m in a["metrics"]] == [m["actor/grad_norm"] for m in b["metrics"]]
    # ... and the layers really were recomputed: each training forward ran again in backward.
    assert b["layer_forwards"] > 0 and a["layer_forwards"] > b["layer_forwards"]


@pytest.mark.flags("--sfpo-zscore-two-sided")
def test_two_sided_trigger_fires_on_a_falling_entropy(runs):
    one, two = runs["one_sided"]["metrics"], runs["two_sided"]["metrics"]
    e1, e2 = one[0]["sfpo/entropy"], one[1]["sfpo/entropy"]
    assert e2 < e1, "the case needs the entropy to fall from step 1 to step 2"
    assert two[1]["sfpo/trigger_step"] == 2.0  # |z| = 1 >= 0.5
    assert one[1]["sfpo/trigger_step"] == -1.0  # z = -1 < 0.5


@pytest.mark.flags("--kl-type")
def test_kl_type_k3_is_low_var_kl(runs):
    k3, low_var = runs["kl_k3"]["params"], runs["kl_low_var"]["params"]
    for n, t in low_var.items():
        assert torch.equal(k3[n], t), n
    assert [m["actor/kl"] for m in runs["kl_k3"]["metrics"]] == [m["actor/kl"] for m in runs["kl_low_var"]["metrics"]]
    assert runs["kl_k3"]["metrics"][1]["actor/kl"] > 0
    # The KL term acts: without it the update lands elsewhere.
    assert rel_error(k3, reference(runs["hf"])) > 100 * REL


@pytest.mark.flags("--optimizer-cpu-offload")
def test_optimizer_cpu_offload_is_a_no_op_on_cpu(runs):
    # GPU-only (megatron-core's HybridDeviceOptimizer; docs/gpu-validation.md): on a CPU machine the
    # distributed optimizer keeps its own Adam and the update is the reference's.
    got = runs["cpu_offload"]
    assert got["adam"] == runs["dp1"]["adam"] and "HybridDeviceOptimizer" not in got["adam"]
    assert rel_error(got["params"], reference(runs["hf"])) < REL


@pytest.mark.flags("--sfpo-snapshot-offload")
def test_snapshot_offload_keeps_theta0_on_the_host(runs):
    off, dp1 = runs["offload"], runs["dp1"]
    for n, t in dp1["params"].items():
        assert torch.equal(off["params"][n], t), n
    assert (off["snapshot"]["offload"], dp1["snapshot"]["offload"]) == (True, False)
    assert off["snapshot"]["devices"] == ["cpu"]
    # With the main params on a GPU, the offloaded copy is pinned host memory and the plain one stays.
    if off["snapshot"]["param_devices"] != ["cpu"]:
        assert off["snapshot"]["pinned"] and dp1["snapshot"]["devices"] == dp1["snapshot"]["param_devices"]


@pytest.mark.flags("--model-config", "--make-vocab-size-divisible-by", "--overlap-grad-reduce",
                   "--overlap-param-gather")
def test_rl_model_and_ddp_flags_shape_the_setup(runs):
    import json

    cfg = json.loads((runs["hf"] / "config.json").read_text())
    got = runs["rl_arch"]
    assert (got["num_layers"], got["hidden_size"]) == (cfg["num_hidden_layers"], cfg["hidden_size"])
    assert cfg["vocab_size"] == 256 and got["embedding_rows"] == 288  # padded to a multiple of 96
    assert got["overlap_grad_reduce"] and got["overlap_param_gather"]
    assert got["no_sync_func"] and got["param_sync_func"]  # wired into megatron's schedules


@pytest.mark.flags("--finetune", "--no-load-optim", "--no-load-rng")
def test_rl_load_flags(runs):
    r = runs["rl_init"]
    saved = r["saved"]
    assert saved["adam"] > 0
    expected = {  # flag → (step, Adam state restored, RNG restored)
        "resume": (1, True, True), "finetune": (0, False, False),
        "no_optim": (1, False, True), "no_rng": (1, True, False)}
    for name, (step, adam, rng) in expected.items():
        got = r[name]
        assert (got["step"], got["weight_version"]) == (step, step), name
        assert got["adam"] == (saved["adam"] if adam else 0.0), name
        assert (got["rng_is_saved"], got["rng_is_own"]) == (rng, not rng), name
        for n, t in saved["params"].items():  # the checkpoint's weights in every case
            assert torch.equal(got["params"][n], t), (name, n)
