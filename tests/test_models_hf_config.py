"""HF config → megatron TransformerConfig / GPTModel kwargs, and the builder's refusals.

In-process, no process group: these are the settings that exact parity needs (each one, set
wrong, was measured to move the logits) and the errors.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
import transformers

from sfpo_megatron.models.builder import (
    TransformerEngineUnavailableError,
    check_impl,
    model_provider,
)
from sfpo_megatron.models.hf_config import (
    ParallelLayoutError,
    UnsupportedModelError,
    check_parallel_layout,
    gpt_model_kwargs,
    load_hf_config,
    padded_vocab_size,
    transformer_config_from_hf,
)

SMALL = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


def test_qwen2_transformer_config():
    cfg = transformers.Qwen2Config(**SMALL, rms_norm_eps=1e-5, rope_theta=1e6).to_dict()
    tc = transformer_config_from_hf(cfg, tp=2)
    assert (tc.num_layers, tc.hidden_size, tc.ffn_hidden_size) == (2, 64, 96)
    assert (tc.num_attention_heads, tc.num_query_groups, tc.kv_channels) == (4, 2, 16)
    assert tc.add_qkv_bias and not tc.add_bias_linear  # Qwen2: biases on q/k/v only
    assert tc.gated_linear_unit and tc.activation_func is F.silu
    assert tc.normalization == "RMSNorm" and tc.layernorm_epsilon == 1e-5
    assert not tc.rotary_interleaved and not tc.qk_layernorm
    assert tc.tensor_model_parallel_size == 2 and tc.params_dtype == torch.float32
    assert tc.hidden_dropout == 0.0 and tc.attention_dropout == 0.0


def test_qwen3_and_llama_specifics():
    q3 = transformer_config_from_hf(transformers.Qwen3Config(**SMALL, head_dim=24).to_dict())
    assert q3.qk_layernorm and q3.kv_channels == 24 and not q3.add_qkv_bias
    llama = transformer_config_from_hf(transformers.LlamaConfig(**SMALL).to_dict(),
                                       params_dtype="bf16")
    assert not llama.add_qkv_bias and not llama.qk_layernorm
    assert llama.params_dtype == torch.bfloat16 and llama.bf16 and not llama.fp16


def test_rope_base_from_transformers_4_and_5_configs():
    v5 = transformers.Qwen2Config(**SMALL, rope_theta=1e6).to_dict()
    assert "rope_theta" not in v5 and v5["rope_parameters"]["rope_theta"] == 1e6
    v4 = {**{k: v for k, v in v5.items() if k != "rope_parameters"}, "rope_theta": 1e6}
    for cfg in (v5, v4):
        kwargs = gpt_model_kwargs(cfg)
        assert kwargs["rotary_base"] == 1e6 and kwargs["position_embedding_type"] == "rope"
        assert kwargs["rope_scaling"] is False


def test_llama31_rope_scaling_from_either_format():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    v4 = {**transformers.LlamaConfig(**SMALL).to_dict(), "rope_parameters": None,
          "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **scaling}}
    v5 = transformers.LlamaConfig(**SMALL, max_position_embeddings=131072, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, **scaling}).to_dict()
    for cfg in (v4, v5):
        arch = load_hf_config(cfg)
        assert arch.rope_theta == 500000.0
        assert arch.llama3_rope_scaling == (8.0, 1.0, 4.0, 8192)
        kwargs = gpt_model_kwargs(cfg)
        assert kwargs["rope_scaling"] is True and kwargs["rope_scaling_factor"] == 8.0


def test_tied_embeddings_and_vocab_padding():
    tied = transformers.Qwen2Config(**SMALL, tie_word_embeddings=True).to_dict()
    untied = transformers.Qwen2Config(**SMALL, tie_word_embeddings=False).to_dict()
    assert gpt_model_kwargs(tied)["share_embeddings_and_output_weights"] is True
    assert gpt_model_kwargs(untied)["share_embeddings_and_output_weights"] is False
    assert gpt_model_kwargs(tied, tp=1)["vocab_size"] == 128
    assert gpt_model_kwargs(tied, tp=2)["vocab_size"] == 128
    assert padded_vocab_size(151936, 128, 1) == 151936  # Qwen2: already a multiple of 128
    # the padded size does not depend on TP (checkpoints stay loadable at another TP)
    assert padded_vocab_size(151936, 128, 2) == padded_vocab_size(151936, 128, 1) == 151936
    assert padded_vocab_size(151937, 128, 8) == 152064
    assert padded_vocab_size(100, 128, 3) == 384  # lcm(128, 3)


def test_unsupported_model_type_names_it_and_the_supported_ones():
    with pytest.raises(UnsupportedModelError) as err:
        load_hf_config({"model_type": "gpt2", "vocab_size": 10})
    assert str(err.value) == "unsupported model_type 'gpt2'; supported: llama, qwen2, qwen3, qwen3_moe"


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "gelu"}, "qwen2: unsupported hidden_act 'gelu' (need 'silu')"),
    ({"use_sliding_window": True}, "qwen2: use_sliding_window=True is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}},
     "unsupported RoPE type 'yarn'; supported: default, llama3"),
])
def test_unsupported_features_are_refused(change, message):
    cfg = {**transformers.Qwen2Config(**SMALL).to_dict(), **change}
    with pytest.raises(UnsupportedModelError) as err:
        load_hf_config(cfg)
    assert str(err.value) == message


def test_layout_errors_name_the_numbers():
    arch = load_hf_config(transformers.LlamaConfig(**{**SMALL, "num_key_value_heads": 1}))
    with pytest.raises(ParallelLayoutError) as err:
        check_parallel_layout(arch, tp=2)
    assert str(err.value) == \
        "num_key_value_heads=1 is not divisible by tensor-model-parallel-size=2"
    with pytest.raises(ParallelLayoutError) as err:
        check_parallel_layout(arch, tp=8)
    assert str(err.value) == \
        "num_attention_heads=4 is not divisible by tensor-model-parallel-size=8"
    with pytest.raises(ParallelLayoutError) as err:
        check_parallel_layout(arch, pp=4)
    assert str(err.value) == ("num_hidden_layers=2 is not divisible by "
                              "pipeline-model-parallel-size=4 x virtual stages=1")


def test_unknown_transformer_config_override():
    with pytest.raises(ValueError, match="unknown TransformerConfig field"):
        transformer_config_from_hf(transformers.LlamaConfig(**SMALL).to_dict(), recompute="x")


TE_IMPORTABLE = importlib.util.find_spec("transformer_engine") is not None


@pytest.mark.skipif(TE_IMPORTABLE, reason="checks the error raised where TE is missing")
@pytest.mark.parametrize("impl, fp8", [("transformer_engine", None),
                                       ("transformer_engine", "hybrid")])
def test_transformer_engine_or_fp8_without_te_is_an_error(impl, fp8):
    what = "transformer_impl='transformer_engine'" + (" with fp8='hybrid'" if fp8 else "")
    with pytest.raises(TransformerEngineUnavailableError) as err:
        # refused before megatron's parallel state or any module is touched: no silent fallback
        model_provider(transformers.LlamaConfig(**SMALL).to_dict(), transformer_impl=impl,
                       fp8=fp8)
    assert str(err.value).startswith(f"{what} needs Transformer Engine, which cannot be imported "
                                     "here (ModuleNotFoundError")


def test_fp8_needs_the_te_spec_and_a_known_format():
    with pytest.raises(ValueError) as err:
        check_impl("local", "hybrid", "delayed")
    assert str(err.value) == "fp8='hybrid' needs transformer_impl='transformer_engine', got 'local'"
    with pytest.raises(ValueError, match="unknown fp8 format 'e5m2'"):
        check_impl("transformer_engine", "e5m2", "delayed")
    with pytest.raises(ValueError, match="unknown transformer_impl 'apex'"):
        check_impl("apex", None, "delayed")
