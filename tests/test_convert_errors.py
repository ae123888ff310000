"""Bad HF checkpoints are refused with an error that names the problem (real safetensors files).

Missing, extra and wrongly shaped tensors, a checkpoint of another architecture (by its
config.json, and by its tensor names), and an unsupported model_type given to the converter.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from launch import TOOLS, load_module
from tiny_models import save_conversion_models

from sfpo_megatron.conversion.hf_mapping import (
    ArchitectureMismatchError,
    ExtraTensorError,
    MissingTensorError,
    SafetensorsSource,
    ShapeMismatchError,
    StateDictSource,
    check_hf_checkpoint,
    load_hf_weights,
)
from sfpo_megatron.models.hf_config import UnsupportedModelError

DOWN = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    return save_conversion_models(tmp_path_factory.mktemp("errors"), ("qwen2_untied",))["qwen2_untied"]


def _gpt2() -> transformers.GPT2LMHeadModel:
    """A tiny random GPT-2: an architecture the converter does not support."""
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=1, n_head=2, n_positions=32))


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_intact_checkpoint_passes(qwen2_dir):
    check_hf_checkpoint(SafetensorsSource(str(qwen2_dir)), qwen2_dir, qwen2_dir)


def test_missing_tensor_is_named(qwen2_dir, tmp_path):
    d = _edited_copy(qwen2_dir, tmp_path / "missing", lambda t: t.pop(DOWN))
    with pytest.raises(MissingTensorError) as err:
        check_hf_checkpoint(SafetensorsSource(str(d)), d)
    assert str(err.value) == f"checkpoint is missing tensor {DOWN}"


def test_extra_tensor_is_named(qwen2_dir, tmp_path):
    extra = "model.layers.0.self_attn.gate.weight"
    d = _edited_copy(qwen2_dir, tmp_path / "extra",
                     lambda t: t.__setitem__(extra, torch.zeros(3)))
    with pytest.raises(ExtraTensorError) as err:
        check_hf_checkpoint(SafetensorsSource(str(d)), d)
    assert str(err.value) == \
        f"checkpoint has unexpected tensor {extra} for Qwen2ForCausalLM with this config"


def test_shape_that_does_not_match_the_config(qwen2_dir):
    config = transformers.AutoConfig.from_pretrained(qwen2_dir).to_dict()
    config["intermediate_size"] = 128
    with pytest.raises(ShapeMismatchError) as err:
        check_hf_checkpoint(SafetensorsSource(str(qwen2_dir)), config)
    assert str(err.value) == ("tensor model.layers.0.mlp.gate_proj.weight has shape [96, 64] but "
                              "the config implies [128, 64]")


def test_checkpoint_config_of_another_architecture(qwen2_dir):
    qwen3 = transformers.Qwen3Config(**transformers.AutoConfig.from_pretrained(qwen2_dir)
                                     .to_dict() | {"model_type": "qwen3", "head_dim": 16})
    with pytest.raises(ArchitectureMismatchError) as err:
        check_hf_checkpoint(SafetensorsSource(str(qwen2_dir)), qwen3, qwen2_dir)
    assert str(err.value) == (
        "checkpoint was made for another architecture: the HF checkpoint's config.json has "
        "model_type='qwen2' (expected 'qwen3'), qkv_bias=True (expected False), "
        "qk_norm=False (expected True)")


def test_tensors_of_another_architecture(qwen2_dir):
    source = StateDictSource(_gpt2().state_dict())
    with pytest.raises(ArchitectureMismatchError) as err:
        check_hf_checkpoint(source, qwen2_dir)
    assert str(err.value) == (
        "checkpoint was made for another architecture: only 1 of the 27 Qwen2ForCausalLM tensors "
        "are present (not model.embed_tokens.weight); it holds transformer.h.0.attn.c_attn.bias, "
        "transformer.h.0.attn.c_attn.weight, transformer.h.0.attn.c_proj.bias, ...")


def test_load_hf_weights_checks_before_touching_the_model(qwen2_dir):
    """The loader runs the same checks (here on an in-memory state dict) before any copy."""
    tensors = load_file(qwen2_dir / "model.safetensors")
    tensors.pop("lm_head.weight")
    with pytest.raises(MissingTensorError, match="checkpoint is missing tensor lm_head.weight"):
        load_hf_weights([], qwen2_dir, tensors)


def test_converter_refuses_unsupported_model_type(tmp_path):
    gpt2_dir = tmp_path / "gpt2"
    _gpt2().save_pretrained(gpt2_dir)
    tool = load_module(TOOLS / "convert_hf_to_mcore.py")
    with pytest.raises(UnsupportedModelError) as err:
        tool.main(["--hf-dir", str(gpt2_dir), "--save", str(tmp_path / "out")])
    assert str(err.value) == "unsupported model_type 'gpt2'; supported: llama, qwen2, qwen3"
    assert not (tmp_path / "out").exists()
