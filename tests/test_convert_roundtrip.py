"""HF → megatron torch_dist → HF through the real tools (torchrun, gloo), bit-exact.

* Qwen2 (tied, bf16 safetensors, with a tokenizer): converted at TP=2, exported by one process
  (TP=1, so megatron reshards TP=2 → TP=1 and re-pads the vocab) into several shards.
* Qwen3 (fp32, ``slow``): converted at PP=2, exported under torchrun at TP=2.

Every tensor comes back identical (values and dtype), the directory loads with
``AutoModelForCausalLM.from_pretrained`` and gives the original model's logits, and the tokenizer
and generation config travel along. Exporting with a config of another architecture is refused.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
import torch
from launch import PYTHON, TOOLS, load_module, run, torchrun
from safetensors.torch import load_file
from tiny_models import save_conversion_models, save_word_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from sfpo_megatron.conversion.hf_mapping import ArchitectureMismatchError

TO_MCORE = TOOLS / "convert_hf_to_mcore.py"
TO_HF = TOOLS / "convert_mcore_to_hf.py"


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(str(directory / "*.safetensors"))):
        out.update(load_file(f))
    return out


LAYOUTS = {  # name: (dtype, converter layout, exporter layout or None for one plain process)
    "qwen2_tied": (torch.bfloat16, ["--tensor-model-parallel-size", "2"], None),
    "qwen3": (torch.float32, ["--pipeline-model-parallel-size", "2"],
              ["--tensor-model-parallel-size", "2"]),
}
_cache: dict[str, tuple[Path, Path, Path]] = {}


def _convert(name: str, root: Path) -> tuple[Path, Path, Path]:
    if name not in _cache:
        dtype, convert_layout, export_layout = LAYOUTS[name]
        hf = save_conversion_models(root / "hf", (name,), dtype=dtype)[name]
        save_word_tokenizer(hf, [f"w{i}" for i in range(99)] + ["<unk>"], unk_token="<unk>")
        mcore, back = root / f"{name}_mcore", root / f"{name}_back"
        log = torchrun(2, [str(TO_MCORE), "--hf-dir", str(hf), "--save", str(mcore), *convert_layout]).stdout
        assert "saved" in log
        args = ["--load", str(mcore), "--save", str(back), "--max-shard-size", "100KB"]
        if export_layout is None:
            run([PYTHON, str(TO_HF), *args])
        else:
            torchrun(2, [str(TO_HF), *args, *export_layout])
        _cache[name] = (hf, mcore, back)
    return _cache[name]


# The Qwen3 round trip (PP=2 → distributed TP=2 export) costs two more launches; its code paths
# (PP/TP gathers of iter_hf_weights) are also covered in-process by test_convert_parity.py.
MODEL_PARAMS = ["qwen2_tied", pytest.param("qwen3", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("roundtrip")


@pytest.fixture
def converted(root, request) -> tuple[Path, Path, Path]:
    return _convert(request.param, root)


@pytest.mark.parametrize("converted", MODEL_PARAMS, indirect=True)
def test_round_trip_bit_exact(converted):
    original_dir, mcore, back = converted
    original, exported = _tensors(original_dir), _tensors(back)
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype, key
        assert torch.equal(exported[key], tensor), key
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)
    for f in set(index["weight_map"].values()):
        assert (back / f).exists()
    # the checkpoint layout the trainer's --load reads
    assert (mcore / "latest_checkpointed_iteration.txt").read_text() == "0"
    assert (mcore / "iter_0000000" / "metadata.json").exists()
    assert (mcore / "hf" / "config.json").exists()


@pytest.mark.parametrize("converted", MODEL_PARAMS, indirect=True)
def test_sharded_export(converted):
    _, _, back = converted
    index = json.loads((back / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[-1].endswith(f"-of-{len(files):05d}.safetensors")
    total = sum(t.numel() * t.element_size() for t in _tensors(back).values())
    assert index["metadata"]["total_size"] == total


@pytest.mark.parametrize("converted", MODEL_PARAMS, indirect=True)
def test_export_loads_with_automodel(converted):
    original_dir, _, back = converted
    a = AutoModelForCausalLM.from_pretrained(original_dir).eval()
    b = AutoModelForCausalLM.from_pretrained(back).eval()
    assert b.dtype == a.dtype
    tokens = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(tokens).logits, b(tokens).logits)
    assert (back / "generation_config.json").exists()
    config = json.loads((back / "config.json").read_text())
    assert config["architectures"] == [a.config.architectures[0]]


@pytest.mark.parametrize("converted", ["qwen2_tied"], indirect=True)
def test_tokenizer_travels(converted):
    original_dir, mcore, back = converted
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (back / name).read_bytes() == (original_dir / name).read_bytes()
        assert (mcore / "hf" / name).exists()
    text = "w1 w5 w98 nope"
    assert AutoTokenizer.from_pretrained(back)(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(original_dir)(text)["input_ids"]


@pytest.mark.parametrize("converted", ["qwen2_tied"], indirect=True)
def test_export_refuses_config_of_another_architecture(converted, root):
    tool = load_module(TO_HF)
    qwen3_dir = save_conversion_models(root / "other", ("qwen3",))["qwen3"]
    _, qwen2_mcore, _ = converted
    with pytest.raises(ArchitectureMismatchError) as err:
        tool.resolve_hf_config(str(qwen2_mcore), str(qwen3_dir))
    assert str(err.value) == (
        f"checkpoint was made for another architecture: checkpoint {qwen2_mcore} (its "
        "hf/config.json) has model_type='qwen2' (expected 'qwen3'), head_dim=16 (expected 24), "
        "qkv_bias=True (expected False), qk_norm=False (expected True)")
