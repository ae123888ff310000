"""Corrupt checkpoints fail at load as one ``CheckpointError`` naming the checkpoint and the file.

One checkpoint is saved by the real converter (tools/convert_hf_to_mcore.py) from a tiny HF
model; every case corrupts a copy of it (truncated, one bit flipped, 4 KB overwritten with 0xFF
at the same size) and loads it with the real ``load_checkpoint`` into a megatron model in this
process, or with the real ``sfpo-megatron pretrain --load`` command. The expected checksums are
computed here with zlib from the bytes on disk, and the loaded weights are compared with the HF
safetensors read by the safetensors library.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
import zlib
from pathlib import Path

import pytest
import torch
from launch import PYTHON, TOOLS, run, torchrun
from safetensors.torch import load_file
from tiny_models import TRAINER_VOCAB, save_tiny_model

from sfpo_megatron.components.checkpoint import CheckpointError, load_checkpoint

ITER = "iter_0000000"
FILES = ("__0_0.distcp", "common.pt", "metadata.json", ".metadata")


def truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def flip_bit(data: bytes) -> bytes:
    out = bytearray(data)
    out[len(out) // 2] ^= 0x10
    return bytes(out)


def overwrite(data: bytes) -> bytes:
    """4 KB of 0xFF from a quarter into the file (to its end if shorter): the size is unchanged."""
    out = bytearray(data)
    start = len(out) // 4
    n = min(4096, len(out) - start)
    out[start:start + n] = b"\xff" * n
    return bytes(out)


CORRUPTIONS = {"truncated": truncate, "bit_flip": flip_bit, "overwritten": overwrite}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """The HF model directory and its converted checkpoint root (``root/hf``, ``root/ckpt``)."""
    root = tmp_path_factory.mktemp("integrity")
    save_tiny_model(root / "hf", "qwen2", perturb=0.05, **TRAINER_VOCAB, tie_word_embeddings=True)
    run([PYTHON, str(TOOLS / "convert_hf_to_mcore.py"), "--hf-dir", str(root / "hf"),
         "--save", str(root / "ckpt")])
    return root


@pytest.fixture(scope="module")
def model(saved):
    """A megatron GPTModel of the tiny model (TP = PP = 1) in this process."""
    from sfpo_megatron.distributed import parallel
    from sfpo_megatron.models.builder import model_provider

    parallel.initialize(tp=1, pp=1, seed=0)
    yield model_provider(str(saved / "hf"), perform_initialization=False)
    parallel.destroy()


def corrupted_copy(saved: Path, dst: Path, name: str, corrupt) -> tuple[Path, bytes, bytes]:
    """A copy of the checkpoint root with ``name`` corrupted: (root, original, corrupted bytes)."""
    shutil.copytree(saved / "ckpt", dst)
    path = dst / ITER / name
    original = path.read_bytes()
    path.write_bytes(corrupt(original))
    return dst, original, path.read_bytes()


def drop_manifest(root: Path) -> None:
    """Make the copy look like a checkpoint saved before manifests existed (marker format 1)."""
    marker = root / ITER / "sfpo_meta.json"
    meta = json.loads(marker.read_text())
    for key in ("manifest", "marker_crc32"):
        meta.pop(key)
    meta["format_version"] = 1
    marker.write_text(json.dumps(meta))


def expected_error(root: Path, name: str, kind: str, original: bytes, corrupted: bytes) -> str:
    where = f"checkpoint {root / ITER} is corrupt: "
    if kind == "truncated":
        return where + f"{name} has {len(corrupted)} bytes, its manifest records {len(original)} (truncated)"
    return where + (f"{name} does not match its manifest checksum (crc32 {zlib.crc32(corrupted):08x}, "
                    f"manifest {zlib.crc32(original):08x}): the file was overwritten or damaged after "
                    "it was saved")


def assert_weights_equal_hf(model, hf: Path) -> None:
    hf_weights = load_file(hf / "model.safetensors")
    vocab = TRAINER_VOCAB["vocab_size"]
    assert torch.equal(model.embedding.word_embeddings.weight[:vocab], hf_weights["model.embed_tokens.weight"])
    assert torch.equal(model.decoder.layers[1].mlp.linear_fc2.weight,
                       hf_weights["model.layers.1.mlp.down_proj.weight"])


def zero_weights(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()


@pytest.mark.parametrize("kind", CORRUPTIONS)
@pytest.mark.parametrize("name", FILES)
def test_corrupt_file_is_named(saved, model, tmp_path, name, kind):
    root, original, corrupted = corrupted_copy(saved, tmp_path / "ckpt", name, CORRUPTIONS[kind])
    assert corrupted != original and (kind == "truncated") == (len(corrupted) != len(original))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(str(root), [model], load_optim=False)
    assert str(err.value) == expected_error(root, name, kind, original, corrupted)


def test_valid_checkpoint_round_trip_loads(saved, model, tmp_path):
    shutil.copytree(saved / "ckpt", tmp_path / "ckpt")
    zero_weights(model)
    res = load_checkpoint(str(tmp_path / "ckpt"), [model], load_optim=False)
    assert res.iteration == 0 and res.extra_state == {"converted_from_hf": True}
    assert_weights_equal_hf(model, saved / "hf")


def test_marker_edited_after_the_save(saved, model, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(saved / "ckpt", root)
    marker = root / ITER / "sfpo_meta.json"
    meta = json.loads(marker.read_text())
    meta["manifest"]["__0_0.distcp"]["crc32"] = "00000000"
    marker.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(str(root), [model], load_optim=False)
    assert str(err.value) == f"checkpoint {root / ITER} is corrupt: sfpo_meta.json does not match its own checksum"


def test_checkpoint_without_manifest_loads_with_one_warning(saved, model, tmp_path, caplog):
    root = tmp_path / "ckpt"
    shutil.copytree(saved / "ckpt", root)
    drop_manifest(root)
    zero_weights(model)
    with caplog.at_level(logging.WARNING):
        load_checkpoint(str(root), [model], load_optim=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"checkpoint {root / ITER} has no file manifest (saved by an older version): "
                        "its files are not checked for corruption"]
    assert_weights_equal_hf(model, saved / "hf")


@pytest.mark.parametrize("name", ("__0_0.distcp", "common.pt", "metadata.json", ".metadata"))
def test_truncated_file_without_manifest_is_named(saved, model, tmp_path, name):
    """Without a manifest the torch / megatron read error is caught and the file found."""
    root, original, corrupted = corrupted_copy(saved, tmp_path / "ckpt", name, truncate)
    drop_manifest(root)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(str(root), [model], load_optim=False)
    message = str(err.value)
    assert message.startswith(f"checkpoint {root / ITER} is corrupt: cannot read {name}: "), message
    assert "\n" not in message
    if name.endswith(".distcp"):  # its items end at the end of the file: .metadata knows the size
        assert message.endswith(f"it has {len(corrupted)} bytes but .metadata places data up to byte "
                                f"{len(original)} (truncated)")


# ---- the real command ------------------------------------------------------------------------------


def pretrain(saved: Path, load: Path, out: Path):
    flags = ["--model-config", str(saved / "hf"), "--load", str(load), "--finetune", "--mock-data",
             "--seq-length", "16", "--micro-batch-size", "1", "--global-batch-size", "1",
             "--train-iters", "1", "--lr", "1e-4", "--save", str(out / "ckpt"), "--save-interval", "1",
             "--log-dir", str(out / "logs")]
    start = time.monotonic()
    proc = run([PYTHON, "-m", "sfpo_megatron.cli", "pretrain"] + flags, check=False, timeout=120)
    return proc, time.monotonic() - start


@pytest.mark.parametrize("name,kind", [("__0_0.distcp", "overwritten"), ("common.pt", "truncated"),
                                       ("metadata.json", "bit_flip")])
def test_pretrain_load_of_a_corrupt_checkpoint(saved, tmp_path, name, kind):
    """`sfpo-megatron pretrain --load`: one line naming the file, exit 2, within 60 s, and no
    checkpoint written."""
    root, original, corrupted = corrupted_copy(saved, tmp_path / "init", name, CORRUPTIONS[kind])
    proc, elapsed = pretrain(saved, root, tmp_path / "run")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["sfpo-megatron pretrain: error: " + expected_error(root, name, kind, original, corrupted)]
    assert elapsed < 60
    assert not (tmp_path / "run" / "ckpt").exists() or not any((tmp_path / "run" / "ckpt").iterdir())


def test_pretrain_round_trip_writes_a_verified_checkpoint(saved, model, tmp_path):
    """A valid checkpoint still loads through the command, and what it saves carries a manifest
    that matches its files (and loads)."""
    proc, _ = pretrain(saved, saved / "ckpt", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    it = tmp_path / "run" / "ckpt" / "iter_0000001"
    manifest = json.loads((it / "sfpo_meta.json").read_text())["manifest"]
    on_disk = sorted(p.name for p in it.iterdir() if p.name != "sfpo_meta.json")
    assert sorted(manifest) == on_disk
    for name, entry in manifest.items():
        data = (it / name).read_bytes()
        assert entry == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    assert load_checkpoint(str(tmp_path / "run" / "ckpt"), [model], load_optim=False).iteration == 1


def test_export_of_a_corrupt_checkpoint(saved, tmp_path):
    """tools/convert_mcore_to_hf.py reads checkpoints through the same checks: one line, exit 2."""
    root, original, corrupted = corrupted_copy(saved, tmp_path / "ckpt", "__0_1.distcp", overwrite)
    proc = run([PYTHON, str(TOOLS / "convert_mcore_to_hf.py"), "--load", str(root), "--save",
                str(tmp_path / "out")], check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["convert_mcore_to_hf.py: error: "
                      + expected_error(root, "__0_1.distcp", "overwritten", original, corrupted)]
    assert not (tmp_path / "out").exists()


def test_corruption_seen_by_one_rank_stops_every_rank(saved, tmp_path):
    """Two ranks split the checksums (rank 1 reads __0_0.distcp): every rank stops with the same
    line, none hangs in a collective. (torchrun stops the other worker once one has exited, and
    prints its own summary traceback.)"""
    root, original, corrupted = corrupted_copy(saved, tmp_path / "ckpt", "__0_0.distcp", overwrite)
    proc = torchrun(2, [str(TOOLS / "convert_mcore_to_hf.py"), "--load", str(root), "--save",
                        str(tmp_path / "out"), "--tensor-model-parallel-size", "2"], check=False, timeout=120)
    assert proc.returncode != 0
    assert not re.search(r'File ".*(sfpo_megatron|convert_mcore_to_hf)', proc.stderr), proc.stderr[-3000:]
    line = "convert_mcore_to_hf.py: error: " + expected_error(root, "__0_0.distcp", "overwritten", original,
                                                              corrupted)
    # Only rank 1 hashed __0_0.distcp: the line (from whichever rank printed first) carries its
    # checksum, so the finding crossed ranks; a rank left waiting would have hit the timeout.
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert errors and set(errors) == {line}
