"""JSONL text → megatron's indexed dataset (`.bin`/`.idx`), like Megatron-LM's tools/preprocess_data.py.

    python tools/preprocess_data.py --input docs.jsonl --json-key text --output-prefix OUT \
        --tokenizer-type hf|sentencepiece --tokenizer-path P [--append-eod] [--workers N]

writes OUT_text_document.bin / .idx (Megatron-LM's naming: prefix, json key, "document"); train
with `--data-path OUT_text_document`. One JSON object per line; each document is the tokenized
value of --json-key (no special tokens), plus the EOS id with --append-eod. Blank lines and
documents that tokenize to nothing are skipped and counted. A malformed line stops the run with
an error naming file:line; outputs are written under temporary names and renamed at the end, so
a failed run never leaves a half-written dataset behind.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tqdm import tqdm

from sfpo_megatron.data.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer

TOKENIZER_TYPES = {"hf": HFTokenizer, "sentencepiece": SentencePieceTokenizer}


class MalformedInputError(ValueError):
    """A JSONL line that is not a JSON object with a string under the requested key."""


@dataclass
class PreprocessStats:
    documents: int = 0
    tokens: int = 0
    skipped_empty: int = 0
    output_prefix: str = ""


def output_prefix_for(output_prefix: str, json_key: str) -> str:
    """Megatron-LM's dataset prefix: `{output_prefix}_{json_key}_document`."""
    return f"{output_prefix}_{json_key}_document"


def load_tokenizer(tokenizer_type: str, tokenizer_path: str) -> Tokenizer:
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(f"--tokenizer-type {tokenizer_type!r}: expected one of {sorted(TOKENIZER_TYPES)}")
    return TOKENIZER_TYPES[tokenizer_type](tokenizer_path)


class _Encoder:
    """Parses and tokenizes one line; held once per worker process (tokenizers are not shared)."""

    tokenizer: Tokenizer

    def __init__(self, input_path: str, json_key: str, tokenizer_type: str, tokenizer_path: str,
                 append_eod: bool) -> None:
        self.input_path, self.json_key, self.append_eod = input_path, json_key, append_eod
        self.tokenizer_type, self.tokenizer_path = tokenizer_type, tokenizer_path

    def initialize(self) -> None:
        self.tokenizer = load_tokenizer(self.tokenizer_type, self.tokenizer_path)

    def encode(self, numbered_line: tuple[int, bytes]) -> tuple[Optional[list[int]], int, Optional[str]]:
        """(token ids or None for a blank line, bytes read, error message or None)."""
        lineno, raw = numbered_line
        where = f"{self.input_path}:{lineno}"
        if not raw.strip():
            return None, len(raw), None
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return None, len(raw), f"{where}: not valid JSON ({exc})"
        if not isinstance(record, dict):
            return None, len(raw), f"{where}: expected a JSON object, got {type(record).__name__}"
        if self.json_key not in record:
            return None, len(raw), f"{where}: no key {self.json_key!r} (keys: {sorted(record)})"
        text = record[self.json_key]
        if not isinstance(text, str):
            return None, len(raw), f"{where}: {self.json_key!r} is {type(text).__name__}, expected a string"
        ids = self.tokenizer.encode(text)
        if ids and self.append_eod:
            ids.append(self.tokenizer.eos_id)
        return ids, len(raw), None


_worker_encoder: Optional[_Encoder] = None


def _worker_init(encoder: _Encoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder
    _worker_encoder.initialize()


def _worker_encode(numbered_line: tuple[int, bytes]) -> tuple[Optional[list[int]], int, Optional[str]]:
    assert _worker_encoder is not None
    return _worker_encoder.encode(numbered_line)


def _numbered_lines(path: str) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        yield from enumerate(f, start=1)


def preprocess(input_path: str, json_key: str, output_prefix: str, tokenizer_type: str, tokenizer_path: str,
               append_eod: bool = False, workers: int = 1, progress: bool = True) -> PreprocessStats:
    """Tokenize `input_path` into `output_prefix_for(output_prefix, json_key)`.{bin,idx}."""
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"--input {input_path!r} does not exist")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    encoder = _Encoder(input_path, json_key, tokenizer_type, tokenizer_path, append_eod)
    encoder.initialize()
    prefix = output_prefix_for(output_prefix, json_key)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    bin_tmp, idx_tmp = f"{prefix}.bin.tmp", f"{prefix}.idx.tmp"
    # uint16 whenever the vocabulary fits, as Megatron-LM does; readers take the dtype from the .idx.
    dtype = DType.optimal_dtype(encoder.tokenizer.vocab_size)
    stats = PreprocessStats(output_prefix=prefix)
    builder = IndexedDatasetBuilder(bin_tmp, dtype=dtype)
    pool = None
    try:
        lines = _numbered_lines(input_path)
        if workers == 1:
            results = map(encoder.encode, lines)
        else:
            pool = multiprocessing.Pool(workers, initializer=_worker_init, initargs=(encoder,))
            results = pool.imap(_worker_encode, lines, chunksize=64)  # imap keeps file order
        bar = tqdm(total=os.path.getsize(input_path), unit="B", unit_scale=True, desc="tokenizing",
                   disable=not progress, file=sys.stderr)
        with bar:
            for ids, nbytes, error in results:
                bar.update(nbytes)
                if error is not None:
                    raise MalformedInputError(error)
                if ids is None:
                    continue
                if not ids:
                    stats.skipped_empty += 1
                    continue
                builder.add_document(numpy.asarray(ids, dtype=dtype), [len(ids)])
                stats.documents += 1
                stats.tokens += len(ids)
                bar.set_postfix(docs=stats.documents, refresh=False)
        builder.finalize(idx_tmp)
        os.replace(bin_tmp, f"{prefix}.bin")
        os.replace(idx_tmp, f"{prefix}.idx")
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        builder.data_file.close()
        for tmp in (bin_tmp, idx_tmp):
            if os.path.exists(tmp):
                os.remove(tmp)
    return stats


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="JSONL file, one document per line")
    parser.add_argument("--json-key", default="text", help="key of the document text (default: text)")
    parser.add_argument("--output-prefix", required=True,
                        help="writes PREFIX_<json-key>_document.bin/.idx")
    parser.add_argument("--tokenizer-type", required=True, choices=sorted(TOKENIZER_TYPES))
    parser.add_argument("--tokenizer-path", required=True,
                        help="HF tokenizer directory, or SentencePiece .model file")
    parser.add_argument("--append-eod", action="store_true", help="end every document with the EOS id")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        stats = preprocess(args.input, args.json_key, args.output_prefix, args.tokenizer_type,
                           args.tokenizer_path, append_eod=args.append_eod, workers=args.workers,
                           progress=not args.no_progress)
    except (ValueError, OSError) as exc:
        print(f"preprocess_data: error: {exc}", file=sys.stderr)
        return 1
    print(f"documents: {stats.documents}  tokens: {stats.tokens}  skipped empty: {stats.skipped_empty}")
    print(f"wrote {stats.output_prefix}.bin and {stats.output_prefix}.idx "
          f"(train with --data-path {stats.output_prefix})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
