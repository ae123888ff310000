"""Qwen3-MoE: HF transformers vs megatron-core's MoE GPTModel, logits and exported weights.

Real ``torchrun`` (gloo) launches load tiny random Qwen3-MoE models (8 experts, top-2, one model
all-sparse with ``norm_topk_prob``, one with a dense layer and without it) with
``load_hf_weights`` at several layouts, compare the fp32 logits with the HF model's, and check
that ``iter_hf_weights`` gives back every HF tensor, experts included, exactly once and bit for
bit on global rank 0. The worker is this file run as a script.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from launch import torchrun
from megatron_forward import megatron_logits
from tiny_models import CONVERSION, save_moe_model

VOCAB = CONVERSION["vocab_size"]
MODELS = {"moe": dict(), "moe_mixed": dict(mlp_only_layers=[1], norm_topk_prob=False)}
# name → (tp, pp, ep, expert tp, dispatcher)
LAYOUTS_2 = {"ep1": (1, 1, 1, 1, "alltoall"), "ep2": (1, 1, 2, 1, "alltoall"),
             "ep2_allgather": (1, 1, 2, 1, "allgather"), "tp2": (2, 1, 1, 2, "alltoall"),
             "tp2_etp1_ep2": (2, 1, 2, 1, "alltoall"), "etp2": (1, 1, 1, 2, "alltoall"),
             "pp2": (1, 2, 1, 1, "alltoall")}
LAYOUTS_4 = {"ep2_pp2": (1, 2, 2, 1, "alltoall")}


# ------------------------------------------------------------------------------------------------
# worker (runs under torchrun)
# ------------------------------------------------------------------------------------------------


def _tokens(batch: int = 2, seq: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def worker(hf_root: str, out_path: str, layouts: str) -> None:
    import torch.distributed as dist
    import transformers
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file

    from sfpo_megatron.conversion.hf_mapping import iter_hf_weights, load_hf_weights
    from sfpo_megatron.distributed import parallel
    from sfpo_megatron.distributed.platform import setup_platform
    from sfpo_megatron.models.builder import model_provider

    # HF models before setup_platform(): its CPU patches break transformers' meta-device init.
    tokens = _tokens()
    with torch.no_grad():
        refs = {n: transformers.AutoModelForCausalLM.from_pretrained(
            os.path.join(hf_root, n), dtype=torch.float32).eval()(tokens).logits for n in MODELS}
    setup_platform()
    results: dict = {}
    for layout, (tp, pp, ep, etp, dispatcher) in json.loads(layouts).items():
        parallel.initialize(tp=tp, pp=pp, ep=ep, etp=etp, seed=0)
        for name in MODELS:
            d = os.path.join(hf_root, name)
            model = model_provider(d, tp=tp, pp=pp, ep=ep, etp=etp, perform_initialization=False,
                                   moe_token_dispatcher_type=dispatcher).eval()
            load_hf_weights([model], d, d)
            logits = megatron_logits(model, tokens)
            entry: dict = {}
            if logits is not None:
                entry["max_diff"] = (logits[..., :VOCAB] - refs[name]).abs().max().item()
            exported = list(iter_hf_weights([model], d))
            if dist.get_rank() == 0:
                original = load_file(os.path.join(d, "model.safetensors"))
                names = [n for n, _ in exported]
                entry["export_count"] = len(names)
                entry["export_unique"] = len(set(names))
                entry["export_names_equal"] = sorted(names) == sorted(original)
                entry["export_mismatch"] = [n for n, t in exported if n in original and not (
                    t.dtype == original[n].dtype and torch.equal(t, original[n]))]
            else:
                entry["yielded_on_other_rank"] = len(exported)
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, entry)
            results[f"{layout}/{name}"] = gathered
        ps.destroy_model_parallel()
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results))


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------


def _run(root: Path, nproc: int, layouts: dict) -> dict:
    for name, fields in MODELS.items():
        if not (root / name).exists():
            save_moe_model(root / name, **fields)
    out = root / f"results{nproc}.json"
    torchrun(nproc, [str(Path(__file__)), str(root), str(out), json.dumps(layouts)])
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return _run(tmp_path_factory.mktemp("moe"), 2, LAYOUTS_2)


def _check(results: dict, layout: str) -> None:
    for name in MODELS:
        ranks = results[f"{layout}/{name}"]
        diffs = [r["max_diff"] for r in ranks if "max_diff" in r]
        assert diffs, f"{layout}/{name}: no rank produced logits"
        assert max(diffs) < 1e-4, f"{layout}/{name}: max abs logit diff {max(diffs)}"
        rank0 = ranks[0]
        assert rank0["export_names_equal"], f"{layout}/{name}: exported names differ"
        assert rank0["export_count"] == rank0["export_unique"], f"{layout}/{name}: duplicates"
        assert rank0["export_mismatch"] == [], f"{layout}/{name}: {rank0['export_mismatch']}"
        assert all(r["yielded_on_other_rank"] == 0 for r in ranks[1:])


@pytest.mark.parametrize("layout", list(LAYOUTS_2))
def test_moe_logits_and_export(results, layout):
    _check(results, layout)


@pytest.mark.slow
def test_moe_logits_and_export_ep2_pp2(tmp_path):
    results = _run(tmp_path, 4, LAYOUTS_4)
    _check(results, "ep2_pp2")


if __name__ == "__main__":  # torchrun worker
    worker(sys.argv[1], sys.argv[2], sys.argv[3])
