"""The param-group-step Adam (components/adam.py): what megatron builds without TE / apex, on CPU
and GPU alike. Its math is torch's AdamW; its step count lives in ``param_groups``, so a
distributed-optimizer checkpoint round-trips: DP=2 save -> load -> step equals the uninterrupted
run bit for bit (real ``torchrun`` processes on gloo)."""

from __future__ import annotations

import copy

import megatron.core.optimizer as mcore_optimizer
import megatron.core.optimizer.distrib_optimizer as mcore_distrib_optimizer
import pytest
import torch
from ckpt_reader import read_model_tensors
from launch import read_jsonl, sfpo
from tiny_models import write_tiny_config

from sfpo_megatron.components.adam import ParamGroupStepAdamW, megatron_adam, use_param_group_step_adam

COMMON = ["--mock-data", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
          "--lr", "1e-3", "--seed", "7", "--split", "100,0,0"]


@pytest.mark.parametrize("foreach", [False, True])
def test_matches_torch_adamw(foreach):
    torch.manual_seed(0)
    w0 = [torch.randn(7, 5), torch.randn(5)]
    grads = [[torch.randn(7, 5), torch.randn(5)] for _ in range(4)]
    ours_p = [torch.nn.Parameter(w.clone()) for w in w0]
    ref_p = [torch.nn.Parameter(w.clone()) for w in w0]
    ours = ParamGroupStepAdamW(ours_p, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), foreach=foreach)
    ref = torch.optim.AdamW(ref_p, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), foreach=foreach)
    for g in grads:
        for p, q, t in zip(ours_p, ref_p, g):
            p.grad, q.grad = t.clone(), t.clone()
        ours.step()
        ref.step()
    for p, q in zip(ours_p, ref_p):
        assert torch.equal(p, q)
    assert ours.param_groups[0]["step"] == 4  # the FusedAdam layout megatron checkpoints
    assert set(ours.state[ours_p[0]]) == {"exp_avg", "exp_avg_sq"}


def test_adam_mode_off_is_l2_adam():
    torch.manual_seed(1)
    w, g = torch.randn(4, 3), torch.randn(4, 3)
    p, q = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ours = ParamGroupStepAdamW([p], lr=1e-2, weight_decay=0.1, adam_w_mode=False)
    ref = torch.optim.Adam([q], lr=1e-2, weight_decay=0.1, foreach=False)
    p.grad, q.grad = g.clone(), g.clone()
    ours.step()
    ref.step()
    assert torch.equal(p, q)


def test_state_dict_keeps_the_step_in_param_groups():
    p = torch.nn.Parameter(torch.ones(3))
    opt = ParamGroupStepAdamW([p], lr=0.1)
    for _ in range(3):
        p.grad = torch.ones(3)
        opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    fresh = ParamGroupStepAdamW([q], lr=0.1)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))  # not sharing opt's tensors
    assert fresh.param_groups[0]["step"] == 3
    p.grad, q.grad = torch.ones(3), torch.ones(3)
    opt.step()
    fresh.step()
    assert torch.equal(p, q)


def test_amsgrad_is_refused():
    with pytest.raises(ValueError, match="amsgrad"):
        ParamGroupStepAdamW([torch.nn.Parameter(torch.ones(1))], amsgrad=True)


def test_megatron_builds_it_without_a_fused_adam():
    # This venv has neither Transformer Engine nor apex: megatron fell back to torch's AdamW.
    assert mcore_distrib_optimizer.USING_TE_OPTIMIZER is False
    assert use_param_group_step_adam() == "param_group_step" == megatron_adam()
    assert mcore_optimizer.Adam is ParamGroupStepAdamW and mcore_distrib_optimizer.Adam is ParamGroupStepAdamW
    assert mcore_distrib_optimizer.HAVE_APEX_OR_TE and not mcore_optimizer.USING_PYTORCH_OPTIMIZER
    assert use_param_group_step_adam() == "param_group_step"  # idempotent


@pytest.mark.slow  # three DP=2 runs
def test_dp2_distributed_optimizer_resume_is_bitwise(tmp_path):
    """4 iterations in one run vs 2 + save + a restarted run that loads and trains 2 more."""
    cfg = write_tiny_config(tmp_path / "model", "qwen2", tie_word_embeddings=True)
    init = tmp_path / "init"
    # Weights only (a distributed optimizer has no state to save before its first step).
    sfpo(1, "pretrain", ["--model-config", str(cfg), "--train-iters", "0", "--save", str(init)] + COMMON)

    def flags(name: str) -> list[str]:
        return ["--model-config", str(cfg), "--log-dir", str(tmp_path / name / "logs"),
                "--save", str(tmp_path / name / "ckpt"), "--load", str(init), "--finetune",
                "--use-distributed-optimizer"] + COMMON

    sfpo(2, "pretrain", flags("straight") + ["--train-iters", "4"])
    sfpo(2, "pretrain", flags("resumed") + ["--train-iters", "2"])
    sfpo(2, "pretrain", flags("resumed") + ["--train-iters", "4"])  # restarts from --save

    straight = read_jsonl(tmp_path / "straight" / "logs" / "metrics.jsonl")
    resumed = read_jsonl(tmp_path / "resumed" / "logs" / "metrics.jsonl")
    assert [m["iteration"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(resumed, straight):
        assert a["lm_loss"] == b["lm_loss"], f"iteration {a['iteration']}: loss differs"
        assert a["grad_norm"] == b["grad_norm"], f"iteration {a['iteration']}: grad norm differs"
    # Model weights and the whole optimizer state (fp32 main params, exp_avg, exp_avg_sq).
    got = read_model_tensors(tmp_path / "resumed" / "ckpt", prefix_exclude=("rng_state",))
    want = read_model_tensors(tmp_path / "straight" / "ckpt", prefix_exclude=("rng_state",))
    assert got.keys() == want.keys()
    assert any(k.startswith("optimizer") for k in want), sorted(want)[:5]
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"differ after save -> load -> step: {differ[:5]}"
    # The steps moved the weights (a resume that silently skipped training would also be "equal").
    start = read_model_tensors(init)
    assert any(not torch.equal(start[k], want[k]) for k in start)
