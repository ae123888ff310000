"""Foundation proof (issue 2): layouts agree, the distributed optimizer shards, resume is exact.

Every run is a real process (``torchrun`` on gloo for 2 ranks). All runs start from one
initial checkpoint so that PP stages (seeded per stage, like Megatron-LM) share the weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launch import PYTHON, REPO, read_jsonl, run, sfpo, write_tiny_config

COMMON = ["--mock-data", "--seq-length", "32", "--micro-batch-size", "2",
          "--global-batch-size", "8", "--lr", "1e-3", "--seed", "7", "--split", "100,0,0"]
ITERS = 3
REL = 1e-5


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("trainer")
    cfg = write_tiny_config(root / "model", "qwen2", tie_word_embeddings=True)
    init = root / "init"
    sfpo(1, "pretrain", ["--model-config", str(cfg), "--train-iters", "0", "--save", str(init)]
         + COMMON)
    return {"root": root, "cfg": cfg, "init": init}


def _train(base: dict, name: str, nproc: int, extra: list[str], iters: int = ITERS,
           load: Path | None = None, finetune: bool = True) -> dict:
    out = base["root"] / name
    flags = ["--model-config", str(base["cfg"]), "--train-iters", str(iters),
             "--log-dir", str(out / "logs"), "--save", str(out / "ckpt")] + COMMON + extra
    flags += ["--load", str(load or base["init"])] + (["--finetune"] if finetune else [])
    sfpo(nproc, "pretrain", flags)
    return {"metrics": read_jsonl(out / "logs" / "metrics.jsonl"), "ckpt": out / "ckpt"}


def _params(base: dict, ckpt: Path) -> dict[str, torch.Tensor]:
    out = ckpt.parent / "params.pt"
    run([PYTHON, str(REPO / "tests" / "scripts" / "dump_params.py"), "--model-config",
         str(base["cfg"]), "--load", str(ckpt), "--out", str(out)])
    return torch.load(out)


def _assert_close_rel(a: float, b: float, what: str) -> None:
    assert abs(a - b) <= REL * max(abs(b), 1e-12), f"{what}: {a!r} vs {b!r}"


@pytest.fixture(scope="module")
def reference(base) -> dict:
    ref = _train(base, "ref", 1, [])
    ref["params"] = _params(base, ref["ckpt"])
    init = _params(base, base["init"])
    moved = [k for k in init if not torch.equal(init[k], ref["params"][k])]
    assert len(moved) == len(init), "training left some parameters at their initial values"
    return ref


@pytest.mark.parametrize("name,nproc,extra", [
    ("tp2", 2, ["--tensor-model-parallel-size", "2"]),
    ("pp2", 2, ["--pipeline-model-parallel-size", "2"]),
    ("dp2_distopt", 2, ["--use-distributed-optimizer"]),
])
def test_layout_matches_single_process(base, reference, name, nproc, extra):
    got = _train(base, name, nproc, extra)
    assert [m["iteration"] for m in got["metrics"]] == list(range(1, ITERS + 1))
    for g, r in zip(got["metrics"], reference["metrics"]):
        _assert_close_rel(g["lm_loss"], r["lm_loss"], f"{name} loss at iteration {g['iteration']}")
    params = _params(base, got["ckpt"])
    assert params.keys() == reference["params"].keys()
    # Relative error over the whole parameter vector. (Per tensor, Adam turns the rounding noise
    # of exactly-zero gradients — the K bias of softmax attention — into +-lr steps.)
    diff = torch.cat([(params[k] - t).flatten() for k, t in reference["params"].items()])
    ref = torch.cat([t.flatten() for t in reference["params"].values()])
    rel = (diff.norm() / ref.norm()).item()
    assert rel < REL, f"{name}: parameters after {ITERS} steps differ, relative error {rel:.2e}"


def test_distributed_optimizer_shards_state(base, reference):
    dp1 = reference["metrics"][0]
    got = _train(base, "shard_dp2", 2, ["--use-distributed-optimizer"], iters=1)
    dp2 = got["metrics"][0]  # rank 0's own shard
    for key in ("optimizer/main_param_bytes", "optimizer/adam_state_bytes"):
        ratio = dp2[key] / dp1[key]
        assert 0.45 <= ratio <= 0.55, f"{key}: DP=2 rank holds {ratio:.3f} of DP=1"
    assert dp1["optimizer/adam_state_bytes"] == 2 * dp1["optimizer/main_param_bytes"]


def test_resume_is_bitwise_and_reshards(base, reference):
    # 3 iterations + save, then the same command with --train-iters 6 resumes from `latest`.
    out = base["root"] / "resume"
    flags = ["--model-config", str(base["cfg"]), "--log-dir", str(out / "logs"),
             "--save", str(out / "ckpt")] + COMMON
    first = flags + ["--train-iters", "3", "--load", str(base["init"]), "--finetune"]
    sfpo(1, "pretrain", first)
    sfpo(1, "pretrain", flags + ["--train-iters", "6"])
    resumed = read_jsonl(out / "logs" / "metrics.jsonl")
    straight = _train(base, "straight6", 1, [], iters=6)
    assert [m["iteration"] for m in resumed] == list(range(1, 7))
    for a, b in zip(resumed, straight["metrics"]):
        assert a["lm_loss"] == b["lm_loss"], f"iteration {a['iteration']} differs after resume"
        assert a["grad_norm"] == b["grad_norm"]
    pa, pb = _params(base, out / "ckpt"), _params(base, straight["ckpt"])
    for key in pb:
        assert torch.equal(pa[key], pb[key]), f"param {key} differs after resume"

    # The TP=1 checkpoint of iteration 3 continues at TP=2 with the same loss at iteration 4.
    tp2 = _train(base, "resume_tp2", 2, ["--tensor-model-parallel-size", "2"], iters=4,
                 load=out / "ckpt" / "iter_0000003", finetune=False)
    assert tp2["metrics"][0]["iteration"] == 4
    _assert_close_rel(tp2["metrics"][0]["lm_loss"], straight["metrics"][3]["lm_loss"],
                      "TP=2 loss after loading a TP=1 checkpoint")
