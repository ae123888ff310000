"""HuggingFace ``config.json`` → megatron-core ``TransformerConfig`` + ``GPTModel`` kwargs.

Supported families live in ``FAMILIES`` (one line each). The settings that exact HF parity needs
(measured against the HF models): QKV bias for Qwen2 only on q/k/v
(``add_qkv_bias=True, add_bias_linear=False``), RoPE base from ``rope_theta`` *or*
``rope_parameters["rope_theta"]`` (transformers 5), non-interleaved RoPE, ``layernorm_epsilon =
rms_norm_eps``, SwiGLU as ``gated_linear_unit=True`` + silu, tied embeddings as
``share_embeddings_and_output_weights``.

Qwen3-MoE (``qwen3_moe``) builds megatron-core's own MoE layers: a top-k softmax router (HF's
``norm_topk_prob=True`` is megatron's softmax over the top-k logits, ``False`` its
``moe_router_pre_softmax``), ``moe_intermediate_size`` per expert, dense layers where
``decoder_sparse_step`` / ``mlp_only_layers`` put them (``moe_layer_freq`` as a 0/1 list), and the
auxiliary load-balancing loss weighted by ``router_aux_loss_coef``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from sfpo_megatron.errors import UserError


class UnsupportedModelError(UserError):
    """The HF config describes a model this package cannot build exactly."""


class ParallelLayoutError(UserError):
    """The requested TP/PP layout does not fit the model's heads / layers."""


@dataclass(frozen=True)
class Family:
    """What differs between the supported decoder families (all share HF's Llama tensor names)."""

    architecture: str  # the HF ``architectures[0]`` this family is exported as
    qkv_bias: bool  # biases on q/k/v only (Qwen2)
    qk_norm: bool  # per-head RMSNorm on q and k (Qwen3)
    moe: bool = False  # sparse MoE MLPs (Qwen3-MoE)


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", qkv_bias=False, qk_norm=False),
    "qwen2": Family("Qwen2ForCausalLM", qkv_bias=True, qk_norm=False),
    "qwen3": Family("Qwen3ForCausalLM", qkv_bias=False, qk_norm=True),
    "qwen3_moe": Family("Qwen3MoeForCausalLM", qkv_bias=False, qk_norm=True, moe=True),
}
TOKEN_DISPATCHERS = ("alltoall", "allgather")
SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))
SUPPORTED_ROPE_TYPES = ("default", "llama3")

# Fields that define the tensor layout: two configs that agree on these describe the same
# checkpoint architecture (used to refuse a checkpoint made for another model).
ARCHITECTURE_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
    "num_kv_heads", "head_dim", "qkv_bias", "qk_norm", "tie_word_embeddings",
    "num_experts", "moe_intermediate_size", "moe_layers",
)


@dataclass(frozen=True)
class HFArch:
    """The normalised subset of an HF config that the megatron model and the mapping need."""

    model_type: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    max_position_embeddings: int
    initializer_range: float = 0.02
    attention_dropout: float = 0.0
    # llama3 RoPE scaling: (factor, low_freq_factor, high_freq_factor, original_max_positions)
    llama3_rope_scaling: tuple[float, float, float, int] | None = None
    torch_dtype: str | None = None
    # Mixture of experts (0 experts: a dense model)
    num_experts: int = 0
    moe_top_k: int = 0
    moe_intermediate_size: int = 0
    moe_layers: tuple[bool, ...] = ()  # per layer: True where the MLP is the sparse MoE block
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.0
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def layout(self) -> dict[str, Any]:
        """The architecture-defining fields (see ``ARCHITECTURE_FIELDS``)."""
        return {k: getattr(self, k) for k in ARCHITECTURE_FIELDS}


def _config_dict(hf_config: Any) -> dict[str, Any]:
    if isinstance(hf_config, HFArch):
        return dict(hf_config.raw)
    if isinstance(hf_config, (str, os.PathLike)):
        path = os.fspath(hf_config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no HF config.json at {path}")
        with open(path) as f:
            return json.load(f)
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):  # transformers.PretrainedConfig
        return hf_config.to_dict()
    raise TypeError(f"cannot read an HF config from {type(hf_config).__name__}")


def _rope(cfg: Mapping[str, Any]) -> tuple[float, tuple[float, float, float, int] | None]:
    """RoPE base and llama3 scaling from either transformers 4 (``rope_theta`` + ``rope_scaling``)
    or transformers 5 (``rope_parameters``) configs."""
    params = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        theta = 10000.0  # HF's default when neither field is present
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported RoPE type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    scaling = None
    if rope_type == "llama3":
        scaling = (
            float(params["factor"]),
            float(params.get("low_freq_factor", 1.0)),
            float(params.get("high_freq_factor", 4.0)),
            int(params.get("original_max_position_embeddings", cfg["max_position_embeddings"])),
        )
    return float(theta), scaling


def load_hf_config(hf_config: Any) -> HFArch:
    """Read an HF config (a directory, a config.json path, a dict, a ``PretrainedConfig`` or an
    ``HFArch``) and check that this package can build it exactly."""
    if isinstance(hf_config, HFArch):
        return hf_config
    cfg = _config_dict(hf_config)
    model_type = cfg.get("model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{model_type}: unsupported hidden_act {act!r} (need 'silu')")
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError(f"{model_type}: mlp_bias=True is not supported")
    if cfg.get("attention_bias"):
        # attention_bias in Llama/Qwen3 also adds an o_proj bias, which megatron only offers
        # together with biases on every linear layer.
        raise UnsupportedModelError(f"{model_type}: attention_bias=True is not supported")
    if cfg.get("use_sliding_window"):
        raise UnsupportedModelError(f"{model_type}: use_sliding_window=True is not supported")
    heads = int(cfg["num_attention_heads"])
    rope_theta, llama3 = _rope(cfg)
    moe = _moe_fields(cfg) if family.moe else {}
    return HFArch(
        model_type=model_type,
        architecture=family.architecture,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family.qkv_bias,
        qk_norm=family.qk_norm,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        initializer_range=float(cfg.get("initializer_range", 0.02)),
        attention_dropout=float(cfg.get("attention_dropout", 0.0) or 0.0),
        llama3_rope_scaling=llama3,
        torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
        raw=cfg,
        **moe,
    )


def _moe_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The MoE fields of a Qwen3-MoE config; which layers are sparse follows HF's
    ``Qwen3MoeDecoderLayer``: not in ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0``."""
    # published configs say num_experts; transformers 5 saves it as num_local_experts
    experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    layers = int(cfg["num_hidden_layers"])
    step = int(cfg.get("decoder_sparse_step") or 1)
    dense = set(cfg.get("mlp_only_layers") or ())
    sparse = tuple(experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(layers))
    if not any(sparse):
        raise UnsupportedModelError(
            f"{cfg['model_type']}: no layer has experts (num_experts={experts}, "
            f"decoder_sparse_step={step}, mlp_only_layers={sorted(dense)})")
    top_k = int(cfg.get("num_experts_per_tok") or 0)
    if not 1 <= top_k <= experts:
        raise UnsupportedModelError(
            f"{cfg['model_type']}: num_experts_per_tok={top_k} must be between 1 and "
            f"num_experts={experts}")
    if not cfg.get("moe_intermediate_size"):
        raise UnsupportedModelError(f"{cfg['model_type']}: the config has no moe_intermediate_size")
    return dict(num_experts=experts, moe_top_k=top_k,
                moe_intermediate_size=int(cfg["moe_intermediate_size"]), moe_layers=sparse,
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                router_aux_loss_coef=float(cfg.get("router_aux_loss_coef") or 0.0))


def check_parallel_layout(arch: HFArch, tp: int = 1, pp: int = 1, vpp: int | None = None,
                          ep: int = 1, etp: int | None = None) -> None:
    """Refuse TP/PP/EP sizes that megatron cannot shard this model into (error names the
    numbers)."""
    if ep > 1 and not arch.is_moe:
        raise ParallelLayoutError(
            f"expert-model-parallel-size={ep} needs a mixture-of-experts model; "
            f"{arch.architecture} has no experts")
    if arch.is_moe and arch.num_experts % ep:
        raise ParallelLayoutError(
            f"num_experts={arch.num_experts} is not divisible by expert-model-parallel-size={ep}")
    etp = tp if etp is None else etp
    if arch.is_moe and arch.moe_intermediate_size % etp:
        raise ParallelLayoutError(
            f"moe_intermediate_size={arch.moe_intermediate_size} is not divisible by "
            f"expert-tensor-parallel-size={etp}")
    if arch.num_heads % tp:
        raise ParallelLayoutError(
            f"num_attention_heads={arch.num_heads} is not divisible by "
            f"tensor-model-parallel-size={tp}"
        )
    if arch.num_kv_heads % tp:
        raise ParallelLayoutError(
            f"num_key_value_heads={arch.num_kv_heads} is not divisible by "
            f"tensor-model-parallel-size={tp}"
        )
    stages = pp * (vpp or 1)
    if arch.num_layers % stages:
        raise ParallelLayoutError(
            f"num_hidden_layers={arch.num_layers} is not divisible by "
            f"pipeline-model-parallel-size={pp} x virtual stages={vpp or 1}"
        )


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128, tp: int = 1) -> int:
    """Pad the vocab (rows of zeros) to a multiple of ``lcm(divisible_by, tp)``.

    Megatron-LM pads to ``divisible_by * tp``, so the stored embedding's shape depends on the TP
    size and a checkpoint saved at TP=1 loads wrongly at TP=2. With the lcm the padded size is the
    same for every TP that divides ``divisible_by`` (1, 2, 4, 8 with the default 128), and each TP
    rank still gets whole rows.
    """
    multiple = math.lcm(make_vocab_size_divisible_by, tp)
    return -(-vocab_size // multiple) * multiple


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_dtype(choice: str, arch: HFArch) -> str:
    """``"auto"`` → the HF config's dtype (``bf16`` / ``fp16``, otherwise ``fp32``)."""
    if choice != "auto":
        return choice
    return {"bfloat16": "bf16", "float16": "fp16"}.get(str(arch.torch_dtype), "fp32")


def transformer_config_from_hf(
    hf_config: Any,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    params_dtype: str | torch.dtype = torch.float32,
    transformer_impl: str = "local",
    fp8: str | None = None,
    fp8_recipe: str = "delayed",
    ep: int = 1,
    etp: int | None = None,
    moe_token_dispatcher_type: str = "alltoall",
    moe_aux_loss_coeff: float | None = None,
    **overrides: Any,
):
    """The ``TransformerConfig`` of this HF model; ``overrides`` are further TransformerConfig
    fields from the trainer (recompute, sequence_parallel, use_cpu_initialization, ...).
    MoE models: ``ep`` / ``etp`` are the expert-(tensor-)parallel sizes, ``moe_aux_loss_coeff``
    replaces the config's ``router_aux_loss_coef`` (0 turns the auxiliary loss off)."""
    arch = load_hf_config(hf_config)
    check_parallel_layout(arch, tp, pp, vpp, ep, etp)
    dtype = parse_dtype(params_dtype)
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown TransformerConfig field(s): {', '.join(unknown)}")
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        rotary_interleaved=False,
        hidden_dropout=0.0,
        attention_dropout=arch.attention_dropout,
        init_method_std=arch.initializer_range,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        transformer_impl=transformer_impl,
        fp8=fp8,
        fp8_recipe=fp8_recipe,
        # The fusions below need TE / apex kernels; the builder's caller may turn them on.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )
    if arch.is_moe:
        if moe_token_dispatcher_type not in TOKEN_DISPATCHERS:
            raise ValueError(f"unknown moe_token_dispatcher_type {moe_token_dispatcher_type!r}; "
                             f"use one of {', '.join(TOKEN_DISPATCHERS)}")
        coeff = arch.router_aux_loss_coef if moe_aux_loss_coeff is None else moe_aux_loss_coeff
        kwargs.update(
            num_moe_experts=arch.num_experts,
            moe_router_topk=arch.moe_top_k,
            moe_ffn_hidden_size=arch.moe_intermediate_size,
            moe_layer_freq=[int(s) for s in arch.moe_layers],
            moe_router_score_function="softmax",
            # HF: softmax over all experts, top-k, then (norm_topk_prob) renormalise; megatron
            # without pre-softmax takes the softmax over the top-k logits, which is the same.
            moe_router_pre_softmax=not arch.norm_topk_prob,
            moe_router_load_balancing_type="aux_loss" if coeff > 0 else "none",
            moe_aux_loss_coeff=coeff,
            moe_router_dtype="fp32",  # HF's router softmax runs in fp32
            moe_grouped_gemm=False,
            moe_token_dispatcher_type=moe_token_dispatcher_type,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=tp if etp is None else etp,
        )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def gpt_model_kwargs(
    hf_config: Any, *, tp: int = 1, make_vocab_size_divisible_by: int = 128,
    max_sequence_length: int | None = None,
) -> dict[str, Any]:

    """``GPTModel(...)`` keyword arguments other than config / layer spec / pre-post process."""
    arch = load_hf_config(hf_config)
    scaling = arch.llama3_rope_scaling
    return dict(
        vocab_size=padded_vocab_size(arch.vocab_size, make_vocab_size_divisible_by, tp),
        max_sequence_length=max_sequence_length or arch.max_position_embeddings,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=arch.rope_theta,
        rope_scaling=scaling is not None,
        rope_scaling_factor=scaling[0] if scaling else 8.0,
        parallel_output=True,
    )
