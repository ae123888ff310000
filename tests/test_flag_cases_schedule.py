"""The LR-schedule flags of `pretrain` and `rl` (both parse them into the same scheduler,
``components/optimizer.py:build_scheduler``): the learning rate and weight decay it sets per step
equal Megatron's documented schedule, computed here from the flag values."""

from __future__ import annotations

import math

import pytest
import torch

from sfpo_megatron.arguments import build_pretrain_parser, build_rl_parser
from sfpo_megatron.components.optimizer import build_scheduler

PARSERS = {"pretrain": build_pretrain_parser, "rl": build_rl_parser}
LR, MIN_LR, WARMUP, DECAY = 0.1, 0.01, 2, 6


def expected_lr(step: int, style: str) -> float:
    """Linear warmup from 0 over WARMUP steps, then (not constant) decay to MIN_LR at DECAY."""
    if step <= WARMUP:
        return LR * step / WARMUP
    if style == "constant":
        return LR
    if step > DECAY:
        return MIN_LR
    ratio = (step - WARMUP) / (DECAY - WARMUP)
    coeff = {"linear": 1.0 - ratio, "cosine": 0.5 * (math.cos(math.pi * ratio) + 1.0)}[style]
    return MIN_LR + coeff * (LR - MIN_LR)


@pytest.mark.flags("--lr", "--min-lr", "--lr-warmup-iters", "--lr-decay-iters", "--lr-decay-style",
                   "--weight-decay", cmd=("pretrain", "rl"))
@pytest.mark.parametrize("cmd", sorted(PARSERS))
@pytest.mark.parametrize("style", ["linear", "cosine", "constant"])
def test_schedule_flags(cmd: str, style: str) -> None:
    args = PARSERS[cmd]().parse_args([
        "--model-config", "unused", "--lr", str(LR), "--min-lr", str(MIN_LR), "--lr-warmup-iters",
        str(WARMUP), "--lr-decay-iters", str(DECAY), "--lr-decay-style", style, "--weight-decay", "0.07"])
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=123.0)
    sched = build_scheduler(args, opt, total_steps=20)  # --lr-decay-iters wins over the run length
    got = [opt.param_groups[0]["lr"]]
    for _ in range(DECAY + 2):
        sched.step(1)
        got.append(opt.param_groups[0]["lr"])
    assert got == pytest.approx([expected_lr(s, style) for s in range(DECAY + 3)], rel=1e-12, abs=1e-15)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.07)


@pytest.mark.parametrize("cmd", sorted(PARSERS))
def test_without_decay_iters_the_run_length_is_the_decay(cmd: str) -> None:
    args = PARSERS[cmd]().parse_args(["--model-config", "unused", "--lr", "1.0", "--lr-decay-style", "linear"])
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    sched = build_scheduler(args, opt, total_steps=4)
    got = [opt.param_groups[0]["lr"]]
    for _ in range(4):
        sched.step(1)
        got.append(opt.param_groups[0]["lr"])
    assert got == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
