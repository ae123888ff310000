"""A checkpoint converted from HF at one TP size trains at another with the same first-step loss."""

from __future__ import annotations

import pytest
from launch import TOOLS, read_jsonl, sfpo, torchrun
from tiny_models import save_conversion_models

COMMON = ["--mock-data", "--seq-length", "32", "--micro-batch-size", "2",
          "--global-batch-size", "4", "--lr", "1e-3", "--seed", "3", "--split", "100,0,0",
          "--train-iters", "1", "--finetune"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_train")
    hf = save_conversion_models(root, ("qwen2_tied",))["qwen2_tied"]
    out = {}
    for tp in (1, 2):
        ckpt = root / f"mcore_tp{tp}"
        torchrun(tp, [str(TOOLS / "convert_hf_to_mcore.py"), "--hf-dir", str(hf), "--save", str(ckpt),
                      "--tensor-model-parallel-size", str(tp)])
        out[tp] = ckpt
    return root, out


def _first_loss(root, ckpt, tp: int, name: str) -> float:
    logs = root / name
    sfpo(2, "pretrain", ["--model-config", str(ckpt / "hf"), "--load", str(ckpt),
                         "--log-dir", str(logs), "--tensor-model-parallel-size", str(tp)]
         + COMMON)
    return read_jsonl(logs / "metrics.jsonl")[0]["lm_loss"]


@pytest.mark.slow  # conversion at two layouts, then TP=2 training
def test_converted_checkpoint_trains_at_another_tp(converted):
    root, ckpt = converted
    # converted at TP=1, trained at TP=2 (and DP=1) vs trained at TP=1 (DP=2): same global batch
    a = _first_loss(root, ckpt[1], 2, "c1_t2")
    b = _first_loss(root, ckpt[1], 1, "c1_t1")
    c = _first_loss(root, ckpt[2], 1, "c2_t1")
    assert abs(a - b) <= 1e-5 * abs(b), (a, b)
    assert abs(c - b) <= 1e-5 * abs(b), (c, b)
