"""Qwen3-MoE checkpoints: HF → megatron torch_dist → HF through the real tools, and the errors
for checkpoints and layouts that do not fit.

* Converted at EP=2 (torchrun, gloo), exported by one process at EP=1 (megatron reshards the
  experts): every tensor, experts included, comes back bit for bit and the directory loads with
  ``AutoModelForCausalLM`` giving the original logits.
* Converted at PP=2, exported under torchrun at EP=2 (both ``slow``: two launches each).
* Converted at EP=2 and trained at EP=1 (and the reverse): the same first loss (``slow``).
* A checkpoint with a missing or extra expert tensor, or made for another expert count, is refused
  with an error naming the tensor / the numbers; impossible expert layouts likewise.
"""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch
from launch import PYTHON, TOOLS, load_module, read_jsonl, run, sfpo, torchrun
from safetensors.torch import load_file
from tiny_models import edited_copy, save_moe_model
from transformers import AutoModelForCausalLM

from sfpo_megatron.conversion.hf_mapping import (
    ArchitectureMismatchError,
    ExtraTensorError,
    MissingTensorError,
    SafetensorsSource,
    ShapeMismatchError,
    check_hf_checkpoint,
)
from sfpo_megatron.distributed.parallel import LayoutError, check_layout
from sfpo_megatron.models.hf_config import ParallelLayoutError, check_parallel_layout, load_hf_config

TO_MCORE = TOOLS / "convert_hf_to_mcore.py"
TO_HF = TOOLS / "convert_mcore_to_hf.py"
EXPERT = "model.layers.1.mlp.experts.{x}.down_proj.weight"


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(str(directory / "*.safetensors"))):
        out.update(load_file(f))
    return out


def _round_trip(tmp_path: Path, convert: list[str], export: list[str] | None, moe_layers: int,
                **fields) -> None:
    hf = save_moe_model(tmp_path / "hf", **fields)
    mcore, back = tmp_path / "mcore", tmp_path / "back"
    assert "saved" in torchrun(2, [str(TO_MCORE), "--hf-dir", str(hf), "--save", str(mcore),
                                   *convert]).stdout
    args = ["--load", str(mcore), "--save", str(back), "--max-shard-size", "100KB"]
    if export is None:
        run([PYTHON, str(TO_HF), *args])
    else:
        torchrun(2, [str(TO_HF), *args, *export])
    original, exported = _tensors(hf), _tensors(back)
    assert sorted(exported) == sorted(original)
    assert len([n for n in original if ".experts." in n]) == moe_layers * 8 * 3
    bad = [n for n in original if not (exported[n].dtype == original[n].dtype
                                      and torch.equal(exported[n], original[n]))]
    assert bad == []
    tokens = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)(tokens).logits
        got = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)(tokens).logits
    assert torch.equal(got, ref)


@pytest.mark.slow
def test_round_trip_ep2_to_ep1(tmp_path):
    _round_trip(tmp_path, ["--expert-model-parallel-size", "2"], None, moe_layers=2)


@pytest.mark.slow
def test_round_trip_pp2_to_ep2(tmp_path):
    _round_trip(tmp_path, ["--pipeline-model-parallel-size", "2"],
                ["--expert-model-parallel-size", "2"], moe_layers=1, mlp_only_layers=[0])


# ---- checkpoints whose experts do not match the config ----------------------------------------


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> Path:
    return save_moe_model(tmp_path_factory.mktemp("moe") / "hf")


def test_intact_moe_checkpoint_passes(moe_dir):
    check_hf_checkpoint(SafetensorsSource(str(moe_dir)), moe_dir, moe_dir)


def test_missing_expert_is_named(moe_dir, tmp_path):
    d = edited_copy(moe_dir, tmp_path / "missing", lambda t: t.pop(EXPERT.format(x=5)))
    with pytest.raises(MissingTensorError) as err:
        check_hf_checkpoint(SafetensorsSource(str(d)), d)
    assert str(err.value) == f"checkpoint is missing tensor {EXPERT.format(x=5)}"


def test_extra_expert_is_named(moe_dir, tmp_path):
    d = edited_copy(moe_dir, tmp_path / "extra", lambda t: t.__setitem__(
        EXPERT.format(x=8), t[EXPERT.format(x=7)].clone()))
    with pytest.raises(ExtraTensorError) as err:
        check_hf_checkpoint(SafetensorsSource(str(d)), d)
    assert str(err.value) == (f"checkpoint has unexpected tensor {EXPERT.format(x=8)} for "
                              "Qwen3MoeForCausalLM with this config")


def test_expert_count_of_another_config(moe_dir):
    """A config asking for 4 experts, a checkpoint (and its config.json) with 8."""
    config = load_hf_config(moe_dir).raw | {"num_experts": 4, "num_local_experts": 4}
    with pytest.raises(ArchitectureMismatchError) as err:
        check_hf_checkpoint(SafetensorsSource(str(moe_dir)), config, moe_dir)
    assert str(err.value) == ("checkpoint was made for another architecture: the HF "
                              "checkpoint's config.json has num_experts=8 (expected 4)")
    # Without the checkpoint's config.json the tensors themselves give it away.
    with pytest.raises(ExtraTensorError) as err:
        check_hf_checkpoint(SafetensorsSource(str(moe_dir)), config)
    assert str(err.value) == ("checkpoint has unexpected tensor "
                              "model.layers.0.mlp.experts.4.down_proj.weight (and 23 more) for "
                              "Qwen3MoeForCausalLM with this config")


def test_expert_width_of_another_config(moe_dir):
    config = load_hf_config(moe_dir).raw | {"moe_intermediate_size": 48}
    with pytest.raises(ShapeMismatchError) as err:
        check_hf_checkpoint(SafetensorsSource(str(moe_dir)), config)
    assert str(err.value) == ("tensor model.layers.0.mlp.experts.0.gate_proj.weight has shape "
                              "[32, 64] but the config implies [48, 64]")


# ---- layouts --------------------------------------------------------------------------------


def test_expert_layout_errors_name_the_numbers(moe_dir):
    moe = load_hf_config(moe_dir)
    cases = [
        (dict(ep=3), "num_experts=8 is not divisible by expert-model-parallel-size=3"),
        (dict(tp=2, etp=3), "moe_intermediate_size=32 is not divisible by "
                            "expert-tensor-parallel-size=3"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ParallelLayoutError) as err:
            check_parallel_layout(moe, **kwargs)
        assert str(err.value) == message
    check_parallel_layout(moe, tp=2, ep=2, etp=1)


def test_trainer_layout_errors_name_the_numbers():
    common = dict(tp=1, pp=1, num_layers=2, num_attention_heads=4, num_query_groups=2,
                  micro_batch_size=1, global_batch_size=None)
    cases = [
        (dict(world_size=2, ep=2, num_experts=0),
         "expert-model-parallel-size 2 needs a mixture-of-experts model; this model has no "
         "experts"),
        (dict(world_size=3, ep=3, num_experts=8),
         "expert-model-parallel-size 3 does not divide the number of experts 8"),
        (dict(world_size=2, ep=4, num_experts=8),
         "world size 2 is not a multiple of expert-tensor-parallel-size 1 x "
         "expert-model-parallel-size 4 x pipeline-model-parallel-size 1 = 4"),
        (dict(world_size=4, ep=2, num_experts=8, pp=2, etp=2),
         "world size 4 is not a multiple of expert-tensor-parallel-size 2 x "
         "expert-model-parallel-size 2 x pipeline-model-parallel-size 2 = 8"),
    ]
    for kwargs, message in cases:
        with pytest.raises(LayoutError) as err:
            check_layout(**(common | kwargs))
        assert str(err.value) == message
    assert check_layout(**(common | dict(world_size=4, ep=2, num_experts=8))) == 4


def test_converter_refuses_ep_for_a_dense_model(tmp_path, capsys):
    from tiny_models import save_conversion_models

    qwen3 = save_conversion_models(tmp_path, ("qwen3",))["qwen3"]
    to_mcore = load_module(TO_MCORE)
    assert to_mcore.cli(["--hf-dir", str(qwen3), "--save", str(tmp_path / "out"),
                         "--expert-model-parallel-size", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "convert_hf_to_mcore.py: error: expert-model-parallel-size=2 needs a mixture-of-experts "
        "model; Qwen3ForCausalLM has no experts")
    assert not (tmp_path / "out").exists()


# ---- a converted checkpoint trains at another expert-parallel size --------------------------

TRAIN = ["--mock-data", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size",
         "4", "--lr", "1e-3", "--seed", "3", "--split", "100,0,0", "--train-iters", "1",
         "--finetune"]


@pytest.mark.slow  # conversion at two layouts, then three 2-process trainings
def test_converted_checkpoint_trains_at_another_ep(tmp_path):
    hf = save_moe_model(tmp_path / "hf")
    ckpt = {}
    for ep in (1, 2):
        ckpt[ep] = tmp_path / f"mcore_ep{ep}"
        torchrun(ep, [str(TO_MCORE), "--hf-dir", str(hf), "--save", str(ckpt[ep]),
                      "--expert-model-parallel-size", str(ep)])

    def first_loss(converted_at: int, ep: int) -> float:
        logs = tmp_path / f"c{converted_at}_t{ep}"
        sfpo(2, "pretrain", ["--model-config", str(hf), "--load", str(ckpt[converted_at]),
                             "--log-dir", str(logs), "--expert-model-parallel-size", str(ep)]
             + TRAIN)
        return read_jsonl(logs / "metrics.jsonl")[0]["lm_loss"]

    base = first_loss(1, 1)
    for converted_at, ep in ((2, 1), (1, 2)):
        loss = first_loss(converted_at, ep)
        assert abs(loss - base) <= 1e-5 * abs(base), (converted_at, ep, loss, base)
