"""Megatron GPTModel built from a HuggingFace config (Qwen2/Qwen2.5, Qwen3, Llama)."""

from sfpo_megatron.models.builder import (
    TransformerEngineUnavailableError,
    build_model,
    model_provider,
)
from sfpo_megatron.models.hf_config import (
    SUPPORTED_MODEL_TYPES,
    HFArch,
    ParallelLayoutError,
    UnsupportedModelError,
    gpt_model_kwargs,
    load_hf_config,
    padded_vocab_size,
    transformer_config_from_hf,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES", "HFArch", "ParallelLayoutError", "TransformerEngineUnavailableError",
    "UnsupportedModelError", "build_model", "gpt_model_kwargs", "load_hf_config", "model_provider",
    "padded_vocab_size", "transformer_config_from_hf",
]
