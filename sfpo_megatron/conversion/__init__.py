"""HF ↔ megatron weight mapping shared by the converters (tools/) and the rollout refit."""

from sfpo_megatron.conversion.hf_mapping import (
    ArchitectureMismatchError,
    ExtraTensorError,
    HFFileError,
    MappingError,
    MissingTensorError,
    SafetensorsSource,
    ShapeMismatchError,
    StateDictSource,
    check_hf_checkpoint,
    check_same_architecture,
    hf_shapes,
    iter_hf_weights,
    load_hf_weights,
)

__all__ = [
    "ArchitectureMismatchError", "ExtraTensorError", "HFFileError", "MappingError",
    "MissingTensorError", "SafetensorsSource", "ShapeMismatchError", "StateDictSource",
    "check_hf_checkpoint", "check_same_architecture", "hf_shapes", "iter_hf_weights",
    "load_hf_weights",
]
