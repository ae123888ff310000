"""Bad HF checkpoints are refused with an error that names the problem (real safetensors files).

Missing, extra and wrongly shaped tensors, a checkpoint of another architecture (by its
config.json, and by its tensor names), an unsupported model_type given to the converter, and a
sharded checkpoint with a shard missing or cut short. The converters (real processes, or their
``cli`` in this process) and ``sfpo-megatron rl --hf-checkpoint`` print such errors as one line
``<tool>: error: ...`` and exit with 2.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import transformers
from launch import PYTHON, REPO, SCRIPTS, TOOLS, child_env, load_module, run
from safetensors.torch import load_file
from tiny_models import edited_copy, save_conversion_models, save_rollout_model

from sfpo_megatron.conversion.hf_mapping import (
    ArchitectureMismatchError,
    ExtraTensorError,
    HFFileError,
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


def test_intact_checkpoint_passes(qwen2_dir):
    check_hf_checkpoint(SafetensorsSource(str(qwen2_dir)), qwen2_dir, qwen2_dir)


def test_missing_tensor_is_named(qwen2_dir, tmp_path):
    d = edited_copy(qwen2_dir, tmp_path / "missing", lambda t: t.pop(DOWN))
    with pytest.raises(MissingTensorError) as err:
        check_hf_checkpoint(SafetensorsSource(str(d)), d)
    assert str(err.value) == f"checkpoint is missing tensor {DOWN}"


def test_extra_tensor_is_named(qwen2_dir, tmp_path):
    extra = "model.layers.0.self_attn.gate.weight"
    d = edited_copy(qwen2_dir, tmp_path / "extra",
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
    assert str(err.value) == "unsupported model_type 'gpt2'; supported: llama, qwen2, qwen3, qwen3_moe"
    assert not (tmp_path / "out").exists()


def test_converter_cli_prints_one_line(tmp_path, capsys):
    """The converters' own errors: one line ``<tool>: error: ...``, exit code 2, nothing saved."""
    gpt2_dir = tmp_path / "gpt2"
    _gpt2().save_pretrained(gpt2_dir)
    to_mcore = load_module(TOOLS / "convert_hf_to_mcore.py")
    to_hf = load_module(TOOLS / "convert_mcore_to_hf.py")
    qwen2 = save_conversion_models(tmp_path, ("qwen2_untied",))["qwen2_untied"]
    cases = [
        (to_mcore.cli, ["--hf-dir", str(gpt2_dir), "--save", str(tmp_path / "out")],
         "convert_hf_to_mcore.py: error: unsupported model_type 'gpt2'; supported: llama, qwen2, qwen3, qwen3_moe"),
        (to_mcore.cli, ["--hf-dir", str(qwen2), "--save", str(tmp_path / "out"),
                        "--tensor-model-parallel-size", "3"],
         "convert_hf_to_mcore.py: error: num_attention_heads=4 is not divisible by "
         "tensor-model-parallel-size=3"),
        (to_mcore.cli, ["--hf-dir", str(tmp_path / "absent"), "--save", str(tmp_path / "out")],
         f"convert_hf_to_mcore.py: error: no HF config.json at {tmp_path / 'absent'}"),
        (to_hf.cli, ["--load", str(tmp_path / "ckpt"), "--save", str(tmp_path / "out")],
         f"convert_mcore_to_hf.py: error: {tmp_path / 'ckpt' / 'hf'}/config.json not found; pass "
         "--hf-config DIR (the HF directory the checkpoint was converted from)"),
    ]
    capsys.readouterr()  # the models' save progress bars
    for cli, argv, message in cases:
        assert cli(argv) == 2
        out = capsys.readouterr()
        assert out.err == message + "\n"
        assert not (tmp_path / "out").exists()


# ---- sharded checkpoints with a missing or truncated shard ----------------------------------------

SHARD = "model-00002-of-00003.safetensors"


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory) -> Path:
    """The rollout model (with its tokenizer, so `rl` can start) saved as three shards + index."""
    root = tmp_path_factory.mktemp("sharded")
    single = save_rollout_model(root / "single")
    out = root / "sharded"
    transformers.AutoModelForCausalLM.from_pretrained(single).save_pretrained(out, max_shard_size="200KB")
    for f in single.iterdir():
        if not f.name.startswith("model"):
            shutil.copyfile(f, out / f.name)
    assert SHARD in json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()
    return out


def _broken(sharded_dir: Path, dst: Path, how: str) -> tuple[Path, str]:
    """A copy with SHARD deleted or cut to half its size, and the error that must name it."""
    shutil.copytree(sharded_dir, dst)
    shard = dst / SHARD
    if how == "missing":
        shard.unlink()
        return dst, (f"HF checkpoint {dst}: shard {SHARD} listed in model.safetensors.index.json "
                     "is missing")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return dst, (f"HF checkpoint {dst}: cannot read shard {SHARD} ({len(data) // 2} bytes; truncated "
                 "or not a safetensors file): Error while deserializing header: incomplete metadata, "
                 "file not fully covered")


@pytest.mark.parametrize("how", ("missing", "truncated"))
def test_broken_shard_is_named(sharded_dir, tmp_path, how):
    SafetensorsSource(str(sharded_dir))  # the intact copy opens
    d, message = _broken(sharded_dir, tmp_path / "hf", how)
    with pytest.raises(HFFileError) as err:
        SafetensorsSource(str(d))
    assert str(err.value) == message


def _one_error_line(proc, prefix: str, message: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "error" in line.lower()] == [prefix + message]


@pytest.mark.parametrize("how", ("missing", "truncated"))
def test_converter_with_a_broken_shard(sharded_dir, tmp_path, how):
    d, message = _broken(sharded_dir, tmp_path / "hf", how)
    start = time.monotonic()
    proc = run([PYTHON, str(TOOLS / "convert_hf_to_mcore.py"), "--hf-dir", str(d), "--save",
                str(tmp_path / "out")], check=False, timeout=120)
    assert time.monotonic() - start < 60
    _one_error_line(proc, "convert_hf_to_mcore.py: error: ", message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ("missing", "truncated"))
def test_rl_hf_checkpoint_with_a_broken_shard(sharded_dir, tmp_path, how):
    d, message = _broken(sharded_dir, tmp_path / "hf", how)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"one two {i}", "answer": "x"}) + "\n" for i in range(4)))
    start = time.monotonic()
    proc = run([PYTHON, "-m", "sfpo_megatron.cli", "rl", "--model-config", str(d), "--hf-checkpoint", str(d),
                "--prompt-data", str(prompts), "--no-chat-template", "--reward-fn",
                "rl_test_rewards:has_letter_o", "--rollout-batch-size", "2", "--n-samples-per-prompt", "2",
                "--rollout-max-response-len", "4", "--num-rollouts", "1", "--micro-batch-size", "4",
                "--save", str(tmp_path / "out")], check=False, timeout=120,
               env=child_env(PYTHONPATH=f"{REPO}:{SCRIPTS}"))
    assert time.monotonic() - start < 60
    _one_error_line(proc, "sfpo-megatron rl: error: ", message)
    assert not (tmp_path / "out").exists()
