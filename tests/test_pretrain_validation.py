"""`pretrain --eval-interval N --eval-iters K`: validation loss the Megatron way, checked against HF.

The trainer runs as real processes (DP=2 under torchrun on gloo, and one plain process); the
references are HF transformers models (the starting HF model, or a trainer checkpoint exported
by tools/convert_mcore_to_hf.py) scoring the same samples in this process with plain
``F.cross_entropy``. The samples are read from the datasets that components/pretrain_data.py
builds from the same flags (the data under test: megatron's GPTDataset / MockGPTDataset), in
the order megatron's pretraining sampler gives them: sample ``i`` of the validation split is the
``i``-th validation sample the run scores, over all DP ranks.

Everything is fp32 on CPU, so megatron's GPTModel and HF's model differ only by the order of
floating-point operations: losses agree to ~1e-6 relative; REL = 1e-5 leaves room for that and
is still far below the gap between two different batches (asserted as well).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from launch import PYTHON, TOOLS, read_jsonl, run, sfpo
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_models import TRAINER_VOCAB, save_tiny_model, write_tiny_config

from sfpo_megatron.arguments import build_pretrain_parser
from sfpo_megatron.components.pretrain_data import (
    DataConfigError,
    DatasetTokenizer,
    build_pretrain_datasets,
    check_eval_flags,
)
from sfpo_megatron.errors import UserError

REL = 1e-5
EOD = TRAINER_VOCAB["eos_token_id"]
GBS, EVAL_ITERS = 4, 2
PER_EVAL = GBS * EVAL_ITERS  # validation samples one evaluation scores


def _write_corpus(prefix: Path, n_docs: int = 200, seed: int = 0) -> str:
    """An indexed dataset of random token documents (ids 2..255), each ending with EOD."""
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for _ in range(n_docs):
        doc = np.append(rng.integers(2, TRAINER_VOCAB["vocab_size"], size=int(rng.integers(5, 60))), EOD)
        builder.add_document(doc.astype(np.uint16), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def _datasets(flags: list[str]) -> tuple:
    """(train, valid) as the trainer builds them from `flags` (the trainer's null tokenizer:
    the model's vocabulary and EOS)."""
    args = build_pretrain_parser().parse_args(flags)
    return build_pretrain_datasets(args, DatasetTokenizer(vocab_size=TRAINER_VOCAB["vocab_size"], eod=EOD))


def _load_hf(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def _hf_loss(model: torch.nn.Module, dataset, indices: range) -> float:
    """sum of masked next-token cross-entropy / number of loss tokens over the samples."""
    samples = [dataset[i] for i in indices]
    tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in samples]).long()
    labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples]).long()
    mask = torch.stack([torch.as_tensor(s["loss_mask"]) for s in samples]).float()
    positions = torch.stack([torch.as_tensor(s["position_ids"]) for s in samples]).long()
    logits = model(input_ids=tokens, position_ids=positions).logits.float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    return float((ce * mask.reshape(-1)).sum() / mask.sum())


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL * abs(b)


def _export_hf(ckpt: Path, hf_config: Path, out: Path) -> Path:
    run([PYTHON, str(TOOLS / "convert_mcore_to_hf.py"), "--load", str(ckpt), "--hf-config",
         str(hf_config), "--save", str(out)])
    return out


@pytest.fixture(scope="module")
def dp2(tmp_path_factory) -> argparse.Namespace:
    """HF model → torch_dist init checkpoint; a DP=2 run on a real indexed dataset with
    --eval-interval 2 --eval-iters 2: 4 iterations, then the same command with --train-iters 5
    resumes from --save (evaluations at 2 and 4, then at the end, 5)."""
    root = tmp_path_factory.mktemp("pretrain_validation")
    hf = save_tiny_model(root / "hf", "qwen2", perturb=0.05, **TRAINER_VOCAB, tie_word_embeddings=True)
    run([PYTHON, str(TOOLS / "convert_hf_to_mcore.py"), "--hf-dir", str(hf), "--save", str(root / "init")])
    data = [
        "--data-path", _write_corpus(root / "corpus"), "--data-cache-path", str(root / "cache"),
        "--split", "80,20,0", "--seq-length", "32", "--micro-batch-size", "1",
        "--global-batch-size", str(GBS), "--eval-interval", "2", "--eval-iters", str(EVAL_ITERS),
        "--seed", "5"]
    flags = ["--model-config", str(hf), "--load", str(root / "init"), "--finetune",
             "--save", str(root / "ckpt"), "--save-interval", "2", "--lr", "3e-3",
             "--log-dir", str(root / "logs"), "--tensorboard-dir", str(root / "tb")] + data
    sfpo(2, "pretrain", flags + ["--train-iters", "4"])
    sfpo(2, "pretrain", flags + ["--train-iters", "5"])
    return argparse.Namespace(root=root, hf=hf, data=data + ["--model-config", str(hf)],
                              lines=read_jsonl(root / "logs" / "metrics.jsonl"))


@pytest.mark.slow  # the module's two DP=2 pretrain runs: ~40 s
@pytest.mark.flags("--eval-interval", "--eval-iters", "--tensorboard-dir", "--train-iters", "--log-dir",
                   "--global-batch-size", cmd="pretrain")
def test_validation_logged_at_the_interval_and_the_end(dp2):
    lines = dp2.lines
    assert [m["iteration"] for m in lines] == [1, 2, 3, 4, 5]
    evaluated = {m["iteration"]: m for m in lines if "validation/lm_loss" in m}
    # Every 2 iterations; 4 is both an interval and leg 1's end: one evaluation. 5 is the end.
    assert sorted(evaluated) == [2, 4, 5]
    assert [evaluated[i]["validation/consumed_samples"] for i in (2, 4, 5)] == [PER_EVAL, 2 * PER_EVAL,
                                                                              3 * PER_EVAL]
    for m in evaluated.values():
        assert m["validation/ppl"] == pytest.approx(np.exp(m["validation/lm_loss"]), rel=1e-12)
    acc = EventAccumulator(str(dp2.root / "tb"))
    acc.Reload()
    events = {e.step: e.value for e in acc.Scalars("validation/lm_loss")}
    assert sorted(events) == [2, 4, 5]
    for i, value in events.items():  # TensorBoard keeps float32
        assert value == pytest.approx(evaluated[i]["validation/lm_loss"], rel=1e-6)


@pytest.mark.slow  # the module's two DP=2 pretrain runs: ~40 s
@pytest.mark.flags("--data-path", "--split", "--seq-length", "--load", cmd="pretrain")
def test_first_training_loss_equals_hf_cross_entropy(dp2):
    train, _ = _datasets(dp2.data + ["--train-iters", "5"])
    expected = _hf_loss(_load_hf(dp2.hf), train, range(GBS))  # iteration 1: samples 0..3
    got = dp2.lines[0]["lm_loss"]
    assert _close(got, expected), (got, expected)
    # The next global batch scores differently: the comparison pins the batch, not just a scale.
    assert not _close(got, _hf_loss(_load_hf(dp2.hf), train, range(GBS, 2 * GBS)))


@pytest.mark.slow  # the module's two DP=2 pretrain runs: ~40 s
@pytest.mark.flags("--save", "--save-interval", "--split", cmd="pretrain")
def test_validation_loss_equals_hf_cross_entropy_of_the_checkpoint(dp2):
    """Iteration 2 scores validation samples 0..7 with the weights after 2 steps; iteration 5 (the
    resumed run's end) scores samples 16..23: the count of scored samples survived the restart."""
    _, valid = _datasets(dp2.data + ["--train-iters", "5"])
    logged = {m["iteration"]: m["validation/lm_loss"] for m in dp2.lines if "validation/lm_loss" in m}
    for iteration, window in ((2, range(0, PER_EVAL)), (5, range(2 * PER_EVAL, 3 * PER_EVAL))):
        hf = _load_hf(_export_hf(dp2.root / "ckpt" / f"iter_{iteration:07d}", dp2.hf,
                                 dp2.root / f"hf_{iteration}"))
        expected = _hf_loss(hf, valid, window)
        assert _close(logged[iteration], expected), (iteration, logged[iteration], expected)
        if iteration == 5:
            # A restart that forgot the scored samples would score 0..7 again: not what was logged.
            assert not _close(logged[iteration], _hf_loss(hf, valid, range(0, PER_EVAL)))


@pytest.mark.slow  # the module's two DP=2 pretrain runs: ~40 s
@pytest.mark.flags("--mock-data", "--eval-iters", "--lr", cmd="pretrain")
def test_mock_data_eval_iters_alone_evaluates_at_the_end(dp2, tmp_path):
    """--mock-data, --eval-iters without --eval-interval: one evaluation, at the end. lr 0 keeps
    the starting weights (the HF model's, through the init checkpoint) through both steps, so the
    HF model scores iteration 1's training batch and the end's validation batches."""
    data = ["--model-config", str(dp2.hf), "--mock-data", "--split", "90,10,0", "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", str(GBS), "--eval-iters", str(EVAL_ITERS),
            "--seed", "3", "--train-iters", "2"]
    sfpo(1, "pretrain", data + ["--load", str(dp2.root / "init"), "--finetune", "--lr", "0",
                                "--log-dir", str(tmp_path / "logs")])
    lines = read_jsonl(tmp_path / "logs" / "metrics.jsonl")
    assert [m["iteration"] for m in lines] == [1, 2]
    assert "validation/lm_loss" not in lines[0]
    train, valid = _datasets(data)
    hf = _load_hf(dp2.hf)
    expected = _hf_loss(hf, valid, range(PER_EVAL))
    assert _close(lines[1]["validation/lm_loss"], expected), (lines[1]["validation/lm_loss"], expected)
    assert _close(lines[0]["lm_loss"], _hf_loss(hf, train, range(GBS)))


CLI_ERRORS = {
    "interval without iters": (["--eval-interval", "2"], "--eval-interval 2 needs --eval-iters > 0 "
                                                          "(validation global batches per evaluation)"),
    "no validation split": (["--eval-interval", "2", "--eval-iters", "3", "--split", "100,0,0"],
                            "--eval-interval 2 --eval-iters 3 needs a validation split, but --split "
                            "'100,0,0' gives it no share (e.g. --split 969,30,1)"),
    "negative iters": (["--eval-iters", "-1"], "--eval-iters must be >= 0, got -1"),
}


@pytest.mark.parametrize("case", sorted(CLI_ERRORS))
def test_bad_eval_flags_stop_before_training(tmp_path, case):
    flags, message = CLI_ERRORS[case]
    cfg = write_tiny_config(tmp_path / "hf", "qwen2")
    proc = run([PYTHON, "-m", "sfpo_megatron.cli", "pretrain", "--model-config", str(cfg), "--mock-data",
                "--log-dir", str(tmp_path / "logs")] + flags, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [f"sfpo-megatron pretrain: error: {message}"]
    assert not (tmp_path / "logs").exists()  # nothing trained, nothing logged


@pytest.mark.parametrize("flags, message", [
    (dict(eval_iters=3, split="1"), "--eval-iters 3 needs a validation split, but --split '1' gives it "
                                    "no share (e.g. --split 969,30,1)"),
    (dict(eval_iters=1, eval_interval=0), "--eval-interval must be >= 1, got 0"),
])
def test_more_eval_flag_errors(flags, message):
    args = argparse.Namespace(**{"eval_iters": 0, "eval_interval": None, "split": "969,30,1", **flags})
    with pytest.raises(DataConfigError) as err:
        check_eval_flags(args)
    assert str(err.value) == message
    assert isinstance(err.value, UserError)
