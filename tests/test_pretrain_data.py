"""Pretraining data: tools/preprocess_data.py → megatron IndexedDataset → GPTDataset iterators.

Tokenizers are built locally (a SentencePiece model trained on the test corpus, a WordLevel HF
tokenizer from the `tokenizers` library); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from launch import PYTHON, TOOLS, load_module, run, torchrun
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from tiny_models import save_word_tokenizer

from sfpo_megatron.components.pretrain_data import (
    DataConfigError,
    DatasetTokenizer,
    PretrainingSampler,
    as_dataset_tokenizer,
    build_pretrain_data_iterators,
    get_batch,
    parse_data_path,
    take,
)
from sfpo_megatron.data.tokenizer import HFTokenizer, SentencePieceTokenizer, train_sentencepiece

TOOL = TOOLS / "preprocess_data.py"
WORDS = ("alpha beta gamma delta epsilon zeta theta lambda sigma omega the a of and to "
         "in is was for on with as by at from 0 1 2 3 4 5 6 7 8 9 + = . ,").split()

pp = load_module(TOOL)  # registered in sys.modules: the tool's process pool pickles functions by name


def _documents(n: int = 120, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(n)]


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _hf_tokenizer_dir(path: Path, pad: bool = True) -> Path:
    return save_word_tokenizer(path, ["<pad>", "<unk>", "<eos>"] + sorted(set(WORDS)), "WhitespaceSplit",
                               eos_token="<eos>", pad_token="<pad>" if pad else None, unk_token="<unk>")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A corpus, both tokenizers, and the corpus preprocessed with SentencePiece (+EOD)."""
    root = tmp_path_factory.mktemp("pretrain_data")
    docs = _documents()
    jsonl = _write_jsonl(root / "docs.jsonl", [{"text": d, "id": i} for i, d in enumerate(docs)])
    sp_model = train_sentencepiece(docs, vocab_size=80, out_prefix=root / "sp")
    stats = pp.preprocess(str(jsonl), "text", str(root / "sp_out"), "sentencepiece", str(sp_model),
                          append_eod=True, progress=False)
    return argparse.Namespace(root=root, docs=docs, jsonl=jsonl, sp_model=sp_model,
                              sp=SentencePieceTokenizer(sp_model), prefix=stats.output_prefix,
                              stats=stats, hf_dir=_hf_tokenizer_dir(root / "hf_tok"))


def _args(**overrides) -> argparse.Namespace:
    args = dict(data_path=None, mock_data=False, split="969,30,1", seq_length=16, micro_batch_size=2,
                global_batch_size=8, seed=1234, train_iters=6, eval_iters=2, num_workers=0,
                data_cache_path=None)
    args.update(overrides)
    return argparse.Namespace(**args)


def _tokens(batches: list[dict]) -> list[list[list[int]]]:
    return [b["tokens"].tolist() for b in batches]


# ------------------------------------------------------------------------------ preprocess


def test_preprocess_sentencepiece_matches_direct_tokenization(env):
    ds = IndexedDataset(env.prefix)
    expected = [env.sp.encode(d) + [env.sp.eos_id] for d in env.docs]
    assert len(ds) == len(env.docs) == env.stats.documents
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    assert env.stats.tokens == sum(map(len, expected))
    assert ds.index.dtype == np.uint16  # small vocab → Megatron-LM's uint16 storage
    assert env.prefix.endswith("sp_out_text_document")


def test_preprocess_cli_hf_two_workers(env, tmp_path):
    # Blank lines and empty documents are skipped and counted, not stored.
    records = [{"text": d} for d in env.docs[:50]] + [{"text": ""}]
    jsonl = tmp_path / "hf.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records[:25]) + "\n\n"
                     + "\n".join(json.dumps(r) for r in records[25:]) + "\n")
    out = run([PYTHON, str(TOOL), "--input", str(jsonl), "--json-key", "text",
               "--output-prefix", str(tmp_path / "hf"), "--tokenizer-type", "hf",
               "--tokenizer-path", str(env.hf_dir), "--append-eod", "--workers", "2"])
    hf = HFTokenizer(env.hf_dir)
    expected = [hf.encode(d) + [hf.eos_id] for d in env.docs[:50]]
    assert all(len(e) > 1 and hf.hf.unk_token_id not in e for e in expected)
    assert f"documents: 50  tokens: {sum(map(len, expected))}  skipped empty: 1" in out.stdout
    assert "tokenizing" in out.stderr  # the tqdm progress bar
    ds = IndexedDataset(str(tmp_path / "hf_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == expected


@pytest.mark.parametrize("line, message", [
    ('{"text": "alpha beta"', "not valid JSON"),
    ('{"body": "alpha"}', "no key 'text' (keys: ['body'])"),
    ('{"text": 7}', "'text' is int, expected a string"),
    ('["alpha"]', "expected a JSON object, got list"),
])
def test_preprocess_malformed_line_names_file_and_line(env, tmp_path, capsys, line, message):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"text": "alpha"}\n\n' + line + '\n{"text": "beta"}\n')
    with pytest.raises(pp.MalformedInputError) as err:
        pp.preprocess(str(jsonl), "text", str(tmp_path / "bad"), "sentencepiece", str(env.sp_model),
                      progress=False)
    assert str(err.value).startswith(f"{jsonl}:3: {message}")
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # no partial .bin/.idx/.tmp left behind
    # The command line reports the same message and exits non-zero.
    assert pp.main(["--input", str(jsonl), "--output-prefix", str(tmp_path / "bad"), "--tokenizer-type",
                    "sentencepiece", "--tokenizer-path", str(env.sp_model), "--no-progress"]) == 1
    assert f"{jsonl}:3: {message}" in capsys.readouterr().err


# ------------------------------------------------------------------------------ datasets


def test_gpt_dataset_deterministic_across_builds_and_caches(env, tmp_path):
    runs = []
    for cache in ("a", "b", "a"):  # two fresh index builds, then a cache hit
        train, valid = build_pretrain_data_iterators(
            _args(data_path=[env.prefix], data_cache_path=str(tmp_path / cache)), env.sp, 0, 0, 1)
        runs.append((_tokens(take(train, 24)), _tokens(take(valid, 16))))
    assert runs[0] == runs[1] == runs[2]
    assert len(runs[0][0]) == 24 and len(runs[0][1]) == 16
    assert any(name.endswith("shuffle_index.npy") for name in os.listdir(tmp_path / "a"))
    # Without --eval-interval a run evaluates once (at the end): valid holds eval_iters *
    # global_batch_size = 16 samples (8 micro-batches) and starts over after them.
    assert runs[0][1][:8] == runs[0][1][8:] and runs[0][1][:4] != runs[0][1][4:8]
    # Samples are real corpus text: every token id is a tokenizer id and EOD separates documents.
    flat = np.array(runs[0][0]).ravel()
    assert flat.max() < env.sp.vocab_size and (flat == env.sp.eos_id).any()
    # Another seed shuffles differently.
    train, _ = build_pretrain_data_iterators(
        _args(data_path=[env.prefix], seed=7, data_cache_path=str(tmp_path / "a")), env.sp, 0, 0, 1)
    assert _tokens(take(train, 24)) != runs[0][0]


def test_resume_from_consumed_samples_gives_the_same_batches(env, tmp_path):
    args = _args(data_path=[env.prefix], data_cache_path=str(tmp_path))
    train, _ = build_pretrain_data_iterators(args, env.sp, 0, 0, 1)
    full = take(train, 6 * 4)  # 6 iterations x 4 micro-batches of 2 = global batch 8
    resumed, _ = build_pretrain_data_iterators(args, env.sp, 3 * args.global_batch_size, 0, 1)
    rest = take(resumed, 3 * 4)
    # DataLoader worker processes change nothing about the order.
    with_workers, _ = build_pretrain_data_iterators(
        _args(data_path=[env.prefix], data_cache_path=str(tmp_path), num_workers=1), env.sp, 3 * 8, 0, 1)
    assert _tokens(take(with_workers, 3 * 4)) == _tokens(rest)
    for a, b in zip(full[12:], rest, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_validation_resumes_from_consumed_valid_samples(env, tmp_path):
    # --eval-interval 3 over 6 iterations: Megatron-LM's validation size, (6 // 3 + 1) evaluations
    # of eval_iters 2 global batches of 8 = 48 samples = 24 micro-batches, read in order.
    args = _args(data_path=[env.prefix], data_cache_path=str(tmp_path), eval_interval=3)
    _, valid = build_pretrain_data_iterators(args, env.sp, 0, 0, 1)
    full = _tokens(take(valid, 48))
    assert len({str(b) for b in full[:24]}) == 24  # 48 distinct samples, then from the start again
    assert full[24:] == full[:24]
    # After one evaluation (16 samples scored) a resumed run's valid_iter reads on from sample 16.
    _, resumed = build_pretrain_data_iterators(args, env.sp, 0, 0, 1, consumed_valid_samples=16)
    assert _tokens(take(resumed, 24)) == full[8:32]


def test_batches_are_shifted_tokens_with_masks(env, tmp_path):
    train, _ = build_pretrain_data_iterators(
        _args(data_path=[env.prefix], data_cache_path=str(tmp_path)), env.sp, 0, 0, 1)
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(train)
    assert tokens.shape == labels.shape == loss_mask.shape == position_ids.shape == (2, 16)
    assert tokens.dtype == labels.dtype == torch.int64
    assert torch.equal(tokens[:, 1:], labels[:, :-1])
    assert torch.equal(position_ids, torch.arange(16).expand(2, 16))
    assert torch.equal(loss_mask, torch.ones(2, 16))
    # megatron's convention: True = masked out, so the causal mask is the strict upper triangle.
    assert torch.equal(attention_mask, torch.ones(2, 1, 16, 16, dtype=torch.bool).triu(1))


def _write_range_dataset(prefix: Path, low: int, high: int, n_docs: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for _ in range(n_docs):
        doc = rng.integers(low, high, size=int(rng.integers(5, 30)))
        builder.add_document(doc.astype(np.uint16), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def test_blend_weights_are_respected(tmp_path):
    a = _write_range_dataset(tmp_path / "a", 1, 100, 50, seed=1)
    b = _write_range_dataset(tmp_path / "b", 100, 200, 300, seed=2)
    tok = DatasetTokenizer(vocab_size=256, eod=0, name="range")
    args = _args(data_path=[f"0.3 {a} 0.7 {b}"], split="1,0,0", train_iters=50, eval_iters=0,
                 global_batch_size=8, seq_length=8, data_cache_path=str(tmp_path / "cache"))
    train, valid = build_pretrain_data_iterators(args, tok, 0, 0, 1)
    assert valid is None
    samples = torch.cat([batch["tokens"] for batch in take(train, 200)])  # 400 samples
    from_a = (samples < 100).all(dim=1)
    assert ((samples >= 100).all(dim=1) | from_a).all()  # a sample never mixes datasets
    # megatron's blend draws the most under-sampled dataset next, so counts track weights closely
    # even though dataset A is 6x smaller than B (it is repeated over several epochs).
    assert abs(int(from_a.sum()) - 0.3 * 400) <= 2


def test_mock_data_iterator(tmp_path):
    args = _args(mock_data=True, seq_length=32)
    tok = DatasetTokenizer(vocab_size=97, eod=0)
    first = take(build_pretrain_data_iterators(args, tok, 0, 0, 1)[0], 4)
    again = take(build_pretrain_data_iterators(args, tok, 0, 0, 1)[0], 4)
    assert _tokens(first) == _tokens(again)
    # MockGPTDataset's documents count 1, 2, 3, ... (mod vocab) and end with EOD.
    tokens = first[0]["tokens"][0]
    nonzero_steps = (tokens[1:] - tokens[:-1])[(tokens[1:] != 0) & (tokens[:-1] != 0)]
    assert set(nonzero_steps.tolist()) <= {1, 1 - 96}


# ------------------------------------------------------------------------------ errors


def test_sampler_splits_chunks_across_data_parallel_ranks():
    ranks = [list(PretrainingSampler(20, 4, 2, r, 2)) for r in range(2)]
    assert ranks[0] == [[4, 5], [8, 9], [12, 13], [16, 17]]
    assert ranks[1] == [[6, 7], [10, 11], [14, 15], [18, 19]]
    assert len(PretrainingSampler(21, 0, 2, 0, 2)) == 5  # the partial last chunk is dropped
    with pytest.raises(DataConfigError, match="consumed_samples 6 is not a non-negative multiple of "
                                              r"micro_batch_size\*data_parallel_size = 4"):
        PretrainingSampler(20, 6, 2, 0, 2)
    with pytest.raises(DataConfigError, match="consumed_samples 24 exceeds the dataset's 20 samples"):
        PretrainingSampler(20, 24, 2, 0, 2)


def test_data_flag_errors(env, tmp_path):
    with pytest.raises(DataConfigError, match="no indexed dataset at '/nope/x'"):
        parse_data_path([f"0.5 {env.prefix} 0.5 /nope/x"])
    with pytest.raises(DataConfigError, match="give either only prefixes or weight/prefix pairs"):
        parse_data_path([f"0.5 {env.prefix} {env.prefix}"])
    with pytest.raises(DataConfigError, match=r"weights must be finite, >= 0 and not all 0, got \[-1.0, 2.0\]"):
        parse_data_path(["-1", env.prefix, "2", env.prefix])
    assert parse_data_path([env.prefix, env.prefix]) == ([env.prefix, env.prefix], None)
    with pytest.raises(DataConfigError, match="--split '90,x': expected up to three"):
        build_pretrain_data_iterators(_args(data_path=[env.prefix], split="90,x"), env.sp, 0, 0, 1)
    # megatron would loop forever on a split without documents.
    with pytest.raises(DataConfigError, match="--split '999,1,0' gives the valid split none of the 120 documents"):
        build_pretrain_data_iterators(_args(data_path=[env.prefix], split="999,1,0"), env.sp, 0, 0, 1)
    with pytest.raises(DataConfigError, match="--split '0,1' gives the train split no share"):
        build_pretrain_data_iterators(_args(data_path=[env.prefix], split="0,1"), env.sp, 0, 0, 1)
    with pytest.raises(DataConfigError, match="pass --data-path PREFIX"):
        build_pretrain_data_iterators(_args(), env.sp, 0, 0, 1)
    with pytest.raises(DataConfigError, match="global_batch_size 8 is not a multiple of micro_batch_size 3"):
        build_pretrain_data_iterators(_args(mock_data=True, micro_batch_size=3), env.sp, 0, 0, 1)


def test_tokenizer_adapter(env, tmp_path):
    sp = as_dataset_tokenizer(env.sp)
    assert (sp.vocab_size, sp.eod, sp.pad) == (env.sp.vocab_size, env.sp.eos_id, env.sp.pad_id)
    hf = HFTokenizer(env.hf_dir)
    assert (as_dataset_tokenizer(hf).vocab_size, as_dataset_tokenizer(hf).eod, as_dataset_tokenizer(hf).pad) == (
        len(hf.hf), 2, 0)
    # Without a pad token HFTokenizer reports pad = eos; megatron must not mask EOS out of the loss.
    no_pad = HFTokenizer(_hf_tokenizer_dir(tmp_path / "no_pad", pad=False))
    assert no_pad.pad_id == no_pad.eos_id
    with pytest.raises(AttributeError, match="no pad token"):
        as_dataset_tokenizer(no_pad).pad
    with pytest.raises(DataConfigError, match=f"tokenizer of type {type(hf.hf).__name__} is not supported"):
        as_dataset_tokenizer(hf.hf)
    with pytest.raises(DataConfigError, match="eod id 10 is outside the vocabulary"):
        DatasetTokenizer(vocab_size=10, eod=10)


# ------------------------------------------------------------------------------ torchrun, DP=2

WORKER = r"""
import sys, numpy as np
from sfpo_megatron.distributed import parallel
env = parallel.initialize(tp=1, pp=1, seed=1)
from megatron.core import parallel_state
import argparse
from sfpo_megatron.components.pretrain_data import build_pretrain_data_iterators, take
from sfpo_megatron.data.tokenizer import SentencePieceTokenizer
prefix, sp_model, cache, out = sys.argv[1:5]
args = argparse.Namespace(data_path=[prefix], mock_data=False, split="969,30,1", seq_length=16,
    micro_batch_size=2, global_batch_size=8, seed=1234, train_iters=6, eval_iters=2, num_workers=0,
    data_cache_path=cache)
dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
train, valid = build_pretrain_data_iterators(args, SentencePieceTokenizer(sp_model), 8, dp_rank, dp_size)
np.save(f"{out}.{dp_rank}.npy", np.stack([b["tokens"].numpy() for b in take(train, 8)]))
parallel.destroy()
"""


def test_torchrun_dp2_shards_the_global_batch(env, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    cache = tmp_path / "cache"
    torchrun(2, [str(worker), env.prefix, str(env.sp_model), str(cache), str(tmp_path / "tok")])
    ranks = [np.load(tmp_path / f"tok.{r}.npy") for r in range(2)]
    # One process with micro-batch 4 = both DP ranks' micro-batches of 2, side by side; both
    # ranks started after one global batch (consumed_samples = 8).
    single, _ = build_pretrain_data_iterators(
        _args(data_path=[env.prefix], micro_batch_size=4, data_cache_path=str(cache)), env.sp, 8, 0, 1)
    expected = np.stack([b["tokens"].numpy() for b in take(single, 8)])
    np.testing.assert_array_equal(np.concatenate(ranks, axis=1), expected)
    assert any(name.endswith("description.txt") for name in os.listdir(cache))  # rank 0 wrote the cache
