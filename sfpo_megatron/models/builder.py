"""Build this rank's megatron-core ``GPTModel`` (one PP stage / virtual chunk) from an HF config.

Two layer specs, picked by ``transformer_impl`` and never swapped silently:

* ``"local"``: megatron's local spec (``ColumnParallelLinear`` / ``RowParallelLinear``, torch
  RMSNorm) with core attention on torch ``scaled_dot_product_attention`` (``SDPAttention``).
  It gives bit-identical logits to HF transformers (which also runs SDPA) at TP=1 in fp32;
  megatron's stock ``DotProductAttention`` differs by float rounding (7e-7 on a tiny Qwen2) and
  materialises the score matrix through megatron's global memory buffer.
* ``"transformer_engine"``: megatron's TE spec, optionally with FP8 (``fp8="hybrid"|"e4m3"``,
  ``fp8_recipe``). Asking for it without an importable Transformer Engine is an error.

Mixture-of-experts configs (Qwen3-MoE) take megatron-core's MoE layers from the same specs
(``get_gpt_decoder_block_spec``: dense and MoE layers where ``moe_layer_freq`` says), with
``SequentialMLP`` experts on the local spec (no grouped GEMM) and the token dispatcher of
``moe_token_dispatcher_type``.

``GPTModel`` wrapping (megatron DDP, Float16Module) is the trainer's job.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.moe import moe_utils

from sfpo_megatron.errors import UserError
from sfpo_megatron.models.hf_config import (
    HFArch,
    gpt_model_kwargs,
    load_hf_config,
    parse_dtype,
    transformer_config_from_hf,
)
from sfpo_megatron.models.sdpa_attention import SDPAttention

TRANSFORMER_IMPLS = ("local", "transformer_engine")
FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")


class TransformerEngineUnavailableError(UserError):
    """``transformer_impl="transformer_engine"`` or FP8 was asked for but TE cannot be imported."""


def _require_transformer_engine(why: str) -> None:
    try:
        import transformer_engine  # noqa: F401  (GPU-only dependency)
    except Exception as e:  # a broken TE install raises RuntimeError, not ImportError
        raise TransformerEngineUnavailableError(
            f"{why} needs Transformer Engine, which cannot be imported here "
            f"({type(e).__name__}: {e}); install transformer-engine[pytorch] on a GPU node or use "
            f"--transformer-impl local without FP8"
        ) from None


def check_impl(transformer_impl: str, fp8: str | None, fp8_recipe: str) -> None:
    """Validate the layer-spec choice; TE / FP8 without TE is an error, never a fallback."""
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(
            f"unknown transformer_impl {transformer_impl!r}; "
            f"use one of {', '.join(TRANSFORMER_IMPLS)}"
        )
    if fp8 is not None:
        if fp8 not in FP8_FORMATS:
            raise ValueError(f"unknown fp8 format {fp8!r}; use one of {', '.join(FP8_FORMATS)}")
        if fp8_recipe not in FP8_RECIPES:
            raise ValueError(
                f"unknown fp8 recipe {fp8_recipe!r}; use one of {', '.join(FP8_RECIPES)}")
        if transformer_impl != "transformer_engine":
            raise ValueError(
                f"fp8={fp8!r} needs transformer_impl='transformer_engine', got {transformer_impl!r}"
            )
    if transformer_impl == "transformer_engine":
        _require_transformer_engine(
            "transformer_impl='transformer_engine'" + (f" with fp8={fp8!r}" if fp8 else "")
        )


def _torch_router_gemm() -> None:
    """megatron-core 0.16.1's router GEMM tests ``te_general_gemm is not None``, a name its
    ``moe_utils`` defines only when Transformer Engine imports; without TE it is a NameError.
    Defining it as None selects megatron's own torch path."""
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def layer_spec(arch: HFArch, transformer_impl: str = "local", config=None,
               vp_stage: int | None = None):
    """The transformer-layer ``ModuleSpec`` for ``arch`` (MoE: this stage's block spec, from
    ``config``)."""
    if arch.is_moe:
        _torch_router_gemm()
        block = get_gpt_decoder_block_spec(
            config, use_transformer_engine=transformer_impl == "transformer_engine",
            normalization="RMSNorm", vp_stage=vp_stage)
        if transformer_impl == "local":
            for spec in block.layer_specs:
                spec.submodules.self_attention.submodules.core_attention = SDPAttention
        return block
    if transformer_impl == "transformer_engine":
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)

    spec = get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def _apply_llama3_rope(model, arch: HFArch) -> None:
    """megatron's RoPE hard-codes llama3's low/high frequency factors and original context
    (1, 4, 8192); recompute ``inv_freq`` with the config's own values."""
    if arch.llama3_rope_scaling is None or not hasattr(model, "rotary_pos_emb"):
        return
    factor, low, high, original = arch.llama3_rope_scaling
    rope = model.rotary_pos_emb
    dim = arch.head_dim
    base = 1.0 / (
        arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32,
                                         device=rope.inv_freq.device) / dim)
    )
    rope.inv_freq = rope._apply_scaling(base, factor=factor, low_freq_factor=low,
                                        high_freq_factor=high,
                                        original_max_position_embeddings=original)


def model_provider(
    hf_config: Any,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    params_dtype: str | torch.dtype = torch.float32,
    transformer_impl: str = "local",
    fp8: str | None = None,
    fp8_recipe: str = "delayed",
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
    make_vocab_size_divisible_by: int = 128,
    max_sequence_length: int | None = None,
    ep: int = 1,
    etp: int | None = None,
    moe_token_dispatcher_type: str = "alltoall",
    moe_aux_loss_coeff: float | None = None,
    **config_overrides: Any,
):
    """This rank's ``GPTModel`` for the HF model ``hf_config`` (a directory, config.json path,
    dict or ``PretrainedConfig``).

    Needs megatron's ``parallel_state`` initialised with the same ``tp`` / ``pp`` (vpp).
    ``pre_process`` / ``post_process`` default to whether this rank (and ``vp_stage``) is the
    first / last pipeline stage. ``config_overrides`` are extra ``TransformerConfig`` fields
    (e.g. ``recompute_granularity="full"``, ``sequence_parallel=True``,
    ``perform_initialization=False`` when weights are loaded right after).
    """
    arch = load_hf_config(hf_config)
    check_impl(transformer_impl, fp8, fp8_recipe)
    actual_tp = parallel_state.get_tensor_model_parallel_world_size()
    actual_pp = parallel_state.get_pipeline_model_parallel_world_size()
    actual_ep = parallel_state.get_expert_model_parallel_world_size()
    if (actual_tp, actual_pp, actual_ep) != (tp, pp, ep):
        raise ValueError(
            f"model_provider asked for tp={tp}, pp={pp}, ep={ep} but megatron parallel_state is "
            f"initialised with tp={actual_tp}, pp={actual_pp}, ep={actual_ep}"
        )
    config = transformer_config_from_hf(
        arch, tp=tp, pp=pp, vpp=vpp, params_dtype=parse_dtype(params_dtype),
        transformer_impl=transformer_impl, fp8=fp8, fp8_recipe=fp8_recipe, ep=ep, etp=etp,
        moe_token_dispatcher_type=moe_token_dispatcher_type,
        moe_aux_loss_coeff=moe_aux_loss_coeff, **config_overrides,
    )
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(arch, transformer_impl, config, vp_stage),
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        **gpt_model_kwargs(arch, tp=tp, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                           max_sequence_length=max_sequence_length),
    )
    _apply_llama3_rope(model, arch)
    return model


# Megatron-LM-style argument name → TransformerConfig field passed through unchanged.
_PASSTHROUGH_ARGS = (
    "sequence_parallel", "recompute_granularity", "recompute_method", "recompute_num_layers",
    "use_cpu_initialization", "perform_initialization", "calculate_per_token_loss",
    "deterministic_mode", "attention_softmax_in_fp32", "bias_dropout_fusion", "apply_rope_fusion",
    "masked_softmax_fusion", "gradient_accumulation_fusion", "tp_comm_overlap", "fp8_param",
    "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
    "account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split",
    "cross_entropy_loss_fusion", "fp8_margin", "fp8_amax_history_len", "fp8_amax_compute_algo",
    "context_parallel_size",
)


def build_model(hf_config: Any, args: Any, pre_process: bool | None = None,
                post_process: bool | None = None, vp_stage: int | None = None):
    """``model_provider`` driven by a Megatron-LM-style namespace (``args.bf16``,
    ``args.tensor_model_parallel_size``, ``args.transformer_impl``, ``args.fp8_format`` ...).
    Unset attributes take megatron's defaults."""
    def arg(name: str, default: Any = None) -> Any:
        value = getattr(args, name, None)
        return default if value is None else value

    if arg("bf16", False):
        dtype = torch.bfloat16
    elif arg("fp16", False):
        dtype = torch.float16
    else:
        dtype = torch.float32
    overrides = {name: getattr(args, name) for name in _PASSTHROUGH_ARGS
                 if getattr(args, name, None) is not None}
    return model_provider(
        hf_config,
        tp=arg("tensor_model_parallel_size", 1),
        pp=arg("pipeline_model_parallel_size", 1),
        vpp=arg("virtual_pipeline_model_parallel_size"),
        params_dtype=dtype,
        transformer_impl=arg("transformer_impl", "local"),
        fp8=arg("fp8_format", arg("fp8")),
        fp8_recipe=arg("fp8_recipe", "delayed"),
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        make_vocab_size_divisible_by=arg("make_vocab_size_divisible_by", 128),
        max_sequence_length=arg("max_position_embeddings"),
        ep=arg("expert_model_parallel_size", 1),
        etp=arg("expert_tensor_parallel_size"),
        moe_token_dispatcher_type=arg("moe_token_dispatcher_type", "alltoall"),
        moe_aux_loss_coeff=arg("moe_aux_loss_coeff"),
        **overrides,
    )
