"""Expert-parallel layouts that cannot work stop at start-up, naming the numbers: the console
script's ``pretrain`` and ``rl`` entry points in this process (they stop before building
anything), and ``pretrain`` on a tiny Qwen3-MoE as a real process with the MoE flags."""

from __future__ import annotations

from pathlib import Path

import pytest
from launch import PYTHON, read_jsonl, run
from tiny_models import TRAINER_VOCAB, save_conversion_models, save_moe_model

from sfpo_megatron.cli import main

ERRORS = [
    ("dense", ["--expert-model-parallel-size", "2"],
     "expert-model-parallel-size 2 needs a mixture-of-experts model; this model has no experts"),
    ("moe", ["--expert-model-parallel-size", "3"],
     "expert-model-parallel-size 3 does not divide the number of experts 8"),
    ("moe", ["--expert-model-parallel-size", "2"],
     "world size 1 is not a multiple of expert-tensor-parallel-size 1 x expert-model-parallel-size "
     "2 x pipeline-model-parallel-size 1 = 2"),
    ("moe", ["--expert-tensor-parallel-size", "2"],
     "expert-tensor-parallel-size 2 > tensor-model-parallel-size 1 is not supported for training"),
    ("moe", ["--tensor-model-parallel-size", "2"],
     "tensor-model-parallel-size 2 with a mixture-of-experts model needs --sequence-parallel "
     "(megatron's MoE layers refuse to train without it)"),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe_layout")
    return {"moe": save_moe_model(root / "moe", **TRAINER_VOCAB),
            "dense": save_conversion_models(root, ("qwen3",))["qwen3"]}


@pytest.mark.flags("--expert-model-parallel-size", "--expert-tensor-parallel-size",
                   cmd=("pretrain", "rl"))
@pytest.mark.parametrize("cmd", ["pretrain", "rl"])
@pytest.mark.parametrize("model, flags, message", ERRORS)
def test_layout_errors(models, capsys, cmd, model, flags, message):
    extra = ["--mock-data"] if cmd == "pretrain" else ["--prompt-data", "p.jsonl"]
    assert main([cmd, "--model-config", str(models[model]), *extra, *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"sfpo-megatron {cmd}: error: {message}"


@pytest.mark.slow
@pytest.mark.flags("--moe-token-dispatcher-type", "--moe-aux-loss-coeff", cmd="pretrain")
def test_pretrain_moe_flags(models, tmp_path):
    """Two pretraining runs on the same mock batches: the aux loss does not enter the logged LM
    loss (iteration 1 equal) but its gradient moves the routers (later losses differ)."""
    losses, logs = {}, {}
    for name, flags in (("off", ["--moe-aux-loss-coeff", "0", "--moe-token-dispatcher-type",
                                 "allgather"]),
                        ("on", ["--moe-aux-loss-coeff", "0.5"])):
        proc = run([PYTHON, "-m", "sfpo_megatron.cli", "pretrain", "--model-config",
                    str(models["moe"]), "--mock-data", "--seq-length", "32", "--micro-batch-size",
                    "2", "--global-batch-size", "4", "--train-iters", "3", "--lr", "1e-2",
                    "--log-dir", str(tmp_path / name), "--seed", "3", *flags])
        losses[name] = [m["lm_loss"] for m in read_jsonl(tmp_path / name / "metrics.jsonl")
                        if "lm_loss" in m]
        logs[name] = proc.stdout + proc.stderr
    assert "8 experts, top-2, expert-parallel size 1, expert-TP size 1, allgather token " \
           "dispatcher, aux loss coefficient 0\n" in logs["off"]
    assert "alltoall token dispatcher, aux loss coefficient 0.5\n" in logs["on"]
    assert len(losses["on"]) == len(losses["off"]) == 3
    assert losses["on"][0] == losses["off"][0]
    assert losses["on"][2] != losses["off"][2]
