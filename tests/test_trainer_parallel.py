"""The trainer across layouts: they agree, the distributed optimizer shards, resume is exact.

Every run is a real process (``torchrun`` on gloo for 2 ranks). All runs start from one
initial checkpoint so that PP stages (seeded per stage, like Megatron-LM) share the weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ckpt_reader import read_model_tensors
from launch import read_jsonl, sfpo
from tiny_models import write_tiny_config

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
    return read_model_tensors(ckpt)


def _assert_close_rel(a: float, b: float, what: str) -> None:
    assert abs(a - b) <= REL * max(abs(b), 1e-12), f"{what}: {a!r} vs {b!r}"


@pytest.fixture(scope="module")
def reference(base) -> dict:
    """One process, 6 iterations, checkpoints after 3 and 6."""
    ref = _train(base, "ref", 1, ["--save-interval", "3"], iters=6)
    ref["params3"] = _params(base, ref["ckpt"] / "iter_0000003")
    init = _params(base, base["init"])
    moved = [k for k in init if not torch.equal(init[k], ref["params3"][k])]
    assert len(moved) == len(init), "training left some parameters at their initial values"
    return ref


LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "dp2_distopt": ["--use-distributed-optimizer"],
}


@pytest.fixture(scope="module")
def layout_runs(base) -> dict:
    return {name: _train(base, name, 2, extra) for name, extra in LAYOUTS.items()}


@pytest.mark.slow  # four 2-process pretraining runs (the layouts) and a reference
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_matches_single_process(reference, layout_runs, name):
    got = layout_runs[name]
    assert [m["iteration"] for m in got["metrics"]] == list(range(1, ITERS + 1))
    for g, r in zip(got["metrics"], reference["metrics"]):
        _assert_close_rel(g["lm_loss"], r["lm_loss"], f"{name} loss at iteration {g['iteration']}")
    params = _params(None, got["ckpt"])
    ref_params = reference["params3"]
    assert params.keys() == ref_params.keys()
    # Relative error over the whole parameter vector. (Per tensor, Adam turns the rounding noise
    # of exactly-zero gradients — the K bias of softmax attention — into +-lr steps.)
    diff = torch.cat([(params[k] - t).flatten() for k, t in ref_params.items()])
    ref = torch.cat([t.flatten() for t in ref_params.values()])
    rel = (diff.norm() / ref.norm()).item()
    assert rel < REL, f"{name}: parameters after {ITERS} steps differ, relative error {rel:.2e}"


# Megatron's tensor-parallel weights: column-parallel (qkv, fc1) split their output rows, row-parallel
# (proj, fc2) their input columns, the embedding its vocabulary; norms and the fused qkv's
# layer-norm weight stay whole.
_TP_SHARDED = (".linear_qkv.weight", ".linear_qkv.bias", ".linear_proj.weight", ".linear_fc1.weight",
               ".linear_fc2.weight", "word_embeddings.weight")


@pytest.mark.slow  # four 2-process pretraining runs (the layouts) and a reference
@pytest.mark.flags("--tensor-model-parallel-size", cmd="pretrain")
def test_tensor_parallel_rank_holds_its_shard(base, layout_runs):
    """TP=2: rank 0's fp32 main params are exactly its shard of every tensor (half of each
    tensor-parallel weight, all of each replicated one)."""
    tensors = _params(base, layout_runs["tp2"]["ckpt"])
    assert any(k.endswith(_TP_SHARDED) for k in tensors)
    expected = sum(t.numel() // 2 if k.endswith(_TP_SHARDED) else t.numel() for k, t in tensors.items())
    assert layout_runs["tp2"]["metrics"][0]["optimizer/main_param_bytes"] == 4 * expected


@pytest.mark.slow  # four 2-process pretraining runs (the layouts) and a reference
@pytest.mark.flags("--use-distributed-optimizer", cmd="pretrain")
def test_distributed_optimizer_shards_state(reference, layout_runs):
    dp1 = reference["metrics"][0]
    dp2 = layout_runs["dp2_distopt"]["metrics"][0]  # rank 0's own shard
    for key in ("optimizer/main_param_bytes", "optimizer/adam_state_bytes"):
        ratio = dp2[key] / dp1[key]
        assert 0.45 <= ratio <= 0.55, f"{key}: DP=2 rank holds {ratio:.3f} of DP=1"
    assert dp1["optimizer/adam_state_bytes"] == 2 * dp1["optimizer/main_param_bytes"]


@pytest.mark.slow  # resume at three layouts
@pytest.mark.flags("--save", "--load", "--train-iters", cmd="pretrain")
def test_resume_is_bitwise_and_reshards(base, reference):
    # 3 iterations + save, then the same command with --train-iters 6 resumes from `latest` in
    # --save: the checkpoint there wins over --load (which only initialises a fresh run).
    out = base["root"] / "resume"
    flags = ["--model-config", str(base["cfg"]), "--log-dir", str(out / "logs"),
             "--save", str(out / "ckpt"), "--load", str(base["init"]), "--finetune"] + COMMON
    sfpo(1, "pretrain", flags + ["--train-iters", "3"])
    sfpo(1, "pretrain", flags + ["--train-iters", "6"])
    resumed = read_jsonl(out / "logs" / "metrics.jsonl")
    assert [m["iteration"] for m in resumed] == list(range(1, 7))
    for a, b in zip(resumed, reference["metrics"]):
        assert a["lm_loss"] == b["lm_loss"], f"iteration {a['iteration']} differs after resume"
        assert a["grad_norm"] == b["grad_norm"]
    pa, pb = _params(None, out / "ckpt"), _params(None, reference["ckpt"])
    for key in pb:
        assert torch.equal(pa[key], pb[key]), f"param {key} differs after resume"

    # The TP=1 checkpoint of iteration 3 continues at TP=2 with the same loss at iteration 4.
    tp2 = _train(base, "resume_tp2", 2, ["--tensor-model-parallel-size", "2"], iters=4,
                 load=out / "ckpt" / "iter_0000003", finetune=False)
    assert tp2["metrics"][0]["iteration"] == 4
    _assert_close_rel(tp2["metrics"][0]["lm_loss"], reference["metrics"][3]["lm_loss"],
                      "TP=2 loss after loading a TP=1 checkpoint")


@pytest.mark.slow  # three pretraining runs
@pytest.mark.flags("--virtual-pipeline-model-parallel-size", cmd="pretrain")
def test_interleaved_pipeline_matches_single_process(tmp_path):
    """PP=2 x VPP=2 over 4 layers: rank 0 holds layers 1 and 3 (megatron's interleaved layout)
    and the losses equal one process's from the same initial weights."""
    cfg = write_tiny_config(tmp_path / "model", "qwen2", num_hidden_layers=4)
    init = tmp_path / "init"
    sfpo(1, "pretrain", ["--model-config", str(cfg), "--train-iters", "0", "--save", str(init)] + COMMON)

    def train(name: str, nproc: int, extra: list[str]):
        flags = ["--model-config", str(cfg), "--train-iters", str(ITERS), "--log-dir", str(tmp_path / name),
                 "--load", str(init), "--finetune"] + COMMON + extra
        proc = sfpo(nproc, "pretrain", flags)
        return read_jsonl(tmp_path / name / "metrics.jsonl"), proc.stdout + proc.stderr

    single, _ = train("single", 1, [])
    vpp, out = train("vpp", 2, ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"])
    assert "transformer layers per model chunk on rank 0: [[1], [3]]" in out
    assert [m["iteration"] for m in vpp] == list(range(1, ITERS + 1))
    for g, r in zip(vpp, single):
        _assert_close_rel(g["lm_loss"], r["lm_loss"], f"vpp loss at iteration {g['iteration']}")
