"""HF transformers vs converted megatron GPTModel: logits and exported weights.

One real ``torchrun --nproc_per_node 2`` (gloo) launch runs three layouts in turn on five tiny
random HF models saved as safetensors (never downloaded): TP=1 (DP=2), TP=2 and PP=2. For each it
loads the HF weights with ``load_hf_weights`` (streaming from the safetensors file), compares the
fp32 logits with the HF model's, and checks that ``iter_hf_weights`` gives back every HF tensor
bit for bit. The worker is this file run as a script.

On a GPU node the same test checks the Transformer Engine spec:
``SFPO_TEST_TRANSFORMER_IMPL=transformer_engine pytest tests/test_convert_parity.py``.
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
from tiny_models import CONVERSION, CONVERSION_MODELS, save_conversion_models

VOCAB = CONVERSION["vocab_size"]
MODELS = list(CONVERSION_MODELS)
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
IMPL = os.environ.get("SFPO_TEST_TRANSFORMER_IMPL", "local")


# ------------------------------------------------------------------------------------------------
# worker (runs under torchrun)
# ------------------------------------------------------------------------------------------------


def _tokens(batch: int = 2, seq: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def _packed_check(model, hf_model) -> float:
    """Two sequences packed in one row (THD) vs each run alone through HF."""
    from megatron.core.packed_seq_params import PackedSeqParams

    device = next(model.parameters()).device
    lengths = (7, 13)
    tokens = _tokens(1, sum(lengths))
    cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32, device=device)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    with torch.no_grad():
        out = model(tokens.to(device), pos.to(device), None,
                    packed_seq_params=params)[..., :VOCAB].float().cpu()
        ref = torch.cat([hf_model(tokens[:, a:b]).logits for a, b in ((0, 7), (7, 20))], dim=1)
    return (out - ref).abs().max().item()


def worker(hf_root: str, out_path: str) -> None:
    import argparse

    import torch.distributed as dist
    import transformers
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file

    from sfpo_megatron.conversion.hf_mapping import iter_hf_weights, load_hf_weights
    from sfpo_megatron.distributed import parallel
    from sfpo_megatron.distributed.platform import setup_platform
    from sfpo_megatron.models.builder import build_model, model_provider
    from sfpo_megatron.models.hf_config import ParallelLayoutError

    # HF models are loaded before setup_platform(): its CPU patches of torch's tensor factories
    # break transformers' meta-device init (from_pretrained then gets a garbage RoPE inv_freq).
    tokens = _tokens()
    hf_models = {n: transformers.AutoModelForCausalLM.from_pretrained(
        os.path.join(hf_root, n), dtype=torch.float32).eval() for n in MODELS}
    device = setup_platform().device()
    with torch.no_grad():
        refs = {n: m(tokens).logits for n, m in hf_models.items()}
    results: dict = {}
    for layout, (tp, pp) in LAYOUTS.items():
        parallel.initialize(tp=tp, pp=pp, seed=0)
        for name in MODELS:
            d = os.path.join(hf_root, name)
            key = f"{layout}/{name}"
            try:
                if layout == "tp2":  # the trainer's path: a Megatron-LM-style namespace
                    args = argparse.Namespace(tensor_model_parallel_size=tp,
                                              pipeline_model_parallel_size=pp, bf16=False,
                                              use_cpu_initialization=True, transformer_impl=IMPL)
                    model = build_model(d, args)
                else:
                    model = model_provider(d, tp=tp, pp=pp, perform_initialization=False,
                                           transformer_impl=IMPL)
            except ParallelLayoutError as e:
                results[key] = {"error": str(e)}
                continue
            model.to(device).eval()
            load_hf_weights([model], d, d)
            logits = megatron_logits(model, tokens)
            entry: dict = {}
            if logits is not None:
                entry["padded_vocab"] = logits.shape[-1]
                entry["max_diff"] = (logits[..., :VOCAB] - refs[name]).abs().max().item()
            if layout == "tp1" and name == "qwen3":
                entry["packed_max_diff"] = _packed_check(model, hf_models[name])
            exported = dict(iter_hf_weights([model], d))
            if dist.get_rank() == 0:
                original = load_file(os.path.join(d, "model.safetensors"))
                entry["export_names_equal"] = sorted(exported) == sorted(original)
                entry["export_order"] = list(exported)
                entry["export_mismatch"] = [n for n in original if n in exported and not (
                    exported[n].dtype == original[n].dtype and torch.equal(exported[n].cpu(),
                                                                           original[n]))]
            else:
                entry["yielded_on_other_rank"] = len(exported)
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, entry)
            results[key] = gathered
        ps.destroy_model_parallel()
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf")
    save_conversion_models(root)
    out = root / "results.json"
    torchrun(2, [str(Path(__file__)), str(root), str(out)])
    return json.loads(out.read_text())


def _ranks(results: dict, layout: str, name: str) -> list[dict]:
    return results[f"{layout}/{name}"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logit_parity_fp32(results, layout):
    for name in MODELS:
        if layout == "tp2" and name == "llama_1kv":
            continue
        diffs = [r["max_diff"] for r in _ranks(results, layout, name) if "max_diff" in r]
        assert diffs, f"{layout}/{name}: no rank produced logits"
        assert max(diffs) < 1e-4, f"{layout}/{name}: max abs logit diff {max(diffs)}"


def test_vocab_padding_does_not_depend_on_tp(results):
    # lcm(128, tp) padding: the same stored embedding shape at TP=1 and TP=2
    assert _ranks(results, "tp1", "qwen2_tied")[0]["padded_vocab"] == 128
    assert _ranks(results, "tp2", "qwen2_tied")[0]["padded_vocab"] == 128


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_export_bit_exact(results, layout):
    for name in MODELS:
        if layout == "tp2" and name == "llama_1kv":
            continue
        rank0, rank1 = _ranks(results, layout, name)
        assert rank0["export_names_equal"], f"{layout}/{name}: names differ"
        assert rank0["export_mismatch"] == [], f"{layout}/{name}: {rank0['export_mismatch']}"
        assert rank1["yielded_on_other_rank"] == 0
        # tied embeddings: no lm_head is exported; HF order starts with the embedding
        assert rank0["export_order"][0] == "model.embed_tokens.weight"
        has_head = "lm_head.weight" in rank0["export_order"]
        assert has_head == (name not in ("qwen2_tied", "qwen3"))


def test_packed_sequences_sdpa(results):
    diff = _ranks(results, "tp1", "qwen3")[0]["packed_max_diff"]
    assert diff < 1e-4, diff


def test_single_kv_head_refused_at_tp2(results):
    assert results["tp2/llama_1kv"] == {
        "error": "num_key_value_heads=1 is not divisible by tensor-model-parallel-size=2"}


if __name__ == "__main__":  # torchrun worker
    worker(sys.argv[1], sys.argv[2])
