"""Pretraining data the Megatron way: GPTDataset + BlendedMegatronDatasetBuilder + a resumable sampler.

Datasets are megatron's own (`megatron.core.datasets`): indexed `.bin`/`.idx` files written by
`tools/preprocess_data.py`, weighted blends (`--data-path 0.3 A 0.7 B`), `--split 969,30,1`, and
`MockGPTDataset` for tests (`--mock-data`). Megatron-LM's sampler lives in `megatron/training`,
which the megatron-core wheel does not ship, so `PretrainingSampler` below re-implements
`MegatronPretrainingSampler`: sample order is fixed by the seed and a run resumes from its
consumed-samples counter.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import re
from collections import OrderedDict
from typing import Any, Iterator, Optional, Sequence

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer
from megatron.core.datasets.utils import Split, compile_helpers
from megatron.core.tokenizers import MegatronTokenizerBase
from torch.utils.data import DataLoader, Dataset

from sfpo_megatron.data.tokenizer import Tokenizer
from sfpo_megatron.errors import UserError

Batch = dict[str, torch.Tensor]


class DataConfigError(UserError):
    """A data flag (--data-path, --split, batch sizes, consumed samples, tokenizer) is unusable."""


# ----------------------------------------------------------------------------------------------
# Tokenizer facts megatron's datasets read
# ----------------------------------------------------------------------------------------------


class DatasetTokenizer:
    """The part of a tokenizer megatron's GPT datasets use: vocab size, EOD id, optional pad id.

    `GPTDatasetConfig.tokenizer` reads `vocab_size` and `eod`, tries `pad` (which must raise when
    there is none: megatron then uses its own sentinel), and hashes `unique_identifiers` into the
    name of the index cache, so a different tokenizer never reuses another one's cache.
    """

    def __init__(self, vocab_size: int, eod: int, pad: Optional[int] = None, name: str = "") -> None:
        if vocab_size <= 0:
            raise DataConfigError(f"tokenizer vocab_size must be positive, got {vocab_size}")
        if not 0 <= eod < vocab_size:
            raise DataConfigError(f"tokenizer eod id {eod} is outside the vocabulary [0, {vocab_size})")
        self.vocab_size = int(vocab_size)
        self.eod = int(eod)
        self._pad = None if pad is None else int(pad)
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("name", name), ("vocab_size", self.vocab_size),
             ("eod", self.eod), ("pad", self._pad)]
        )

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def pad(self) -> int:
        if self._pad is None:
            raise AttributeError("tokenizer has no pad token")
        return self._pad

    def __repr__(self) -> str:
        return f"DatasetTokenizer({dict(self.unique_identifiers)})"


def as_dataset_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer facts GPTDatasetConfig reads, from this project's or megatron's tokenizers.

    A `sfpo_megatron.data.tokenizer.Tokenizer` becomes a DatasetTokenizer (its pad id counts only
    when distinct from EOS: megatron masks pad labels out of the loss, and EOS must stay in it);
    megatron tokenizers (`MegatronTokenizerBase`, legacy `MegatronLegacyTokenizer`) and
    DatasetTokenizer are used as they are.
    """
    if isinstance(tokenizer, (DatasetTokenizer, MegatronTokenizerBase, MegatronLegacyTokenizer)):
        return tokenizer
    if isinstance(tokenizer, Tokenizer):
        pad = tokenizer.pad_id if tokenizer.pad_id != tokenizer.eos_id else None
        return DatasetTokenizer(vocab_size=tokenizer.vocab_size, eod=tokenizer.eos_id, pad=pad,
                                name=str(getattr(tokenizer, "path", type(tokenizer).__name__)))
    raise DataConfigError(
        f"tokenizer of type {type(tokenizer).__name__} is not supported: pass a "
        "sfpo_megatron.data.tokenizer.Tokenizer, a megatron tokenizer or a DatasetTokenizer"
    )


# ----------------------------------------------------------------------------------------------
# Flags → megatron dataset config
# ----------------------------------------------------------------------------------------------


def _as_float(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def parse_data_path(data_path: Sequence[str]) -> tuple[list[str], Optional[list[float]]]:
    """`--data-path` → (prefixes, weights or None), like Megatron-LM.

    Accepts `["A"]`, `["A", "B"]` (weights from dataset sizes), `["0.3", "A", "0.7", "B"]` or the
    same as one string `"0.3 A 0.7 B"`. Every prefix must have its `.bin` and `.idx`.
    """
    words = [word for item in data_path for word in str(item).split()]
    if not words:
        raise DataConfigError("--data-path is empty")
    numbers = [_as_float(word) for word in words]
    weighted = len(words) % 2 == 0 and all(n is not None for n in numbers[0::2])
    if weighted:
        weights = [float(n) for n in numbers[0::2]]
        prefixes = words[1::2]
        if not all(math.isfinite(w) and w >= 0.0 for w in weights) or sum(weights) <= 0.0:
            raise DataConfigError(f"--data-path weights must be finite, >= 0 and not all 0, got {weights}")
    else:
        if any(n is not None for n in numbers):
            raise DataConfigError(
                f"--data-path {' '.join(words)!r}: give either only prefixes or weight/prefix pairs"
            )
        weights, prefixes = None, words
    for prefix in prefixes:
        if not IndexedDataset.exists(prefix):
            raise DataConfigError(
                f"--data-path: no indexed dataset at {prefix!r} (expected {prefix}.bin and {prefix}.idx)"
            )
    return prefixes, weights


def check_split(split: str) -> str:
    """`--split` is 1-3 comma-separated non-negative numbers (train,valid,test), not all zero."""
    parts = [p.strip() for p in str(split).split(",")]
    if not 1 <= len(parts) <= 3 or not all(re.fullmatch(r"\d+(\.\d*)?|\.\d+", p) for p in parts):
        raise DataConfigError(f"--split {split!r}: expected up to three comma-separated numbers like 969,30,1")
    if sum(float(p) for p in parts) <= 0.0:
        raise DataConfigError(f"--split {split!r}: all parts are zero")
    return ",".join(parts)


def build_dataset_config(args: argparse.Namespace, tokenizer: Any) -> GPTDatasetConfig:
    """GPTDatasetConfig from the flags; `mock_data` wins over `data_path`."""
    if not args.mock_data and not args.data_path:
        raise DataConfigError("no training data: pass --data-path PREFIX [...] or --mock-data")
    blend = None if args.mock_data else parse_data_path(args.data_path)
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        split=check_split(args.split),
        path_to_cache=args.data_cache_path,
        tokenizer=as_dataset_tokenizer(tokenizer),
        # Megatron-LM's defaults; optional flags of the same names switch them.
        reset_position_ids=getattr(args, "reset_position_ids", False),
        reset_attention_mask=getattr(args, "reset_attention_mask", False),
        eod_mask_loss=getattr(args, "eod_mask_loss", False),
        create_attention_mask=getattr(args, "create_attention_mask_in_dataloader", True),
    )


def _check_split_documents(config: GPTDatasetConfig, args: argparse.Namespace) -> None:
    """Every built split must get at least one document of every blended dataset.

    megatron's GPTDataset loops forever looking for tokens in an empty split (e.g. the 1/1000
    test share of --split 969,30,1 on a small corpus), so this is checked first.
    """
    if config.mock:
        return
    for prefix in config.blend[0]:
        n_docs = IndexedDataset(prefix).sequence_lengths.shape[0]
        for split, bounds in zip(Split, config.split_matrix):
            if bounds is not None and round(bounds[1] * n_docs) <= round(bounds[0] * n_docs):
                raise DataConfigError(
                    f"--split {args.split!r} gives the {split.name} split none of the {n_docs} "
                    f"documents of {prefix!r}; use more data or another --split"
                )


def validation_samples(args: argparse.Namespace) -> int:
    """Validation samples a run reads, as Megatron-LM sizes its validation dataset:
    (train_iters // eval_interval + 1) evaluations of eval_iters global batches (one evaluation,
    at the end of training, without --eval-interval); 0 when eval_iters is 0."""
    eval_iters = getattr(args, "eval_iters", 0)
    if eval_iters <= 0:
        return 0
    interval = getattr(args, "eval_interval", None)
    evaluations = args.train_iters // interval + 1 if interval else 1
    return evaluations * eval_iters * args.global_batch_size


def check_eval_flags(args: argparse.Namespace) -> None:
    """--eval-iters / --eval-interval against each other and --split, before anything is built."""
    if args.eval_iters < 0:
        raise DataConfigError(f"--eval-iters must be >= 0, got {args.eval_iters}")
    if args.eval_interval is not None:
        if args.eval_interval < 1:
            raise DataConfigError(f"--eval-interval must be >= 1, got {args.eval_interval}")
        if args.eval_iters == 0:
            raise DataConfigError(f"--eval-interval {args.eval_interval} needs --eval-iters > 0 "
                                  "(validation global batches per evaluation)")
    if args.eval_iters > 0:
        parts = [float(p) for p in check_split(args.split).split(",")]
        if len(parts) < 2 or parts[1] == 0.0:
            flags = f"--eval-iters {args.eval_iters}"
            if args.eval_interval is not None:
                flags = f"--eval-interval {args.eval_interval} {flags}"
            raise DataConfigError(f"{flags} needs a validation split, but --split {args.split!r} "
                                  "gives it no share (e.g. --split 969,30,1)")


def build_pretrain_datasets(
    args: argparse.Namespace, tokenizer: Any
) -> tuple[Dataset, Optional[Dataset]]:
    """(train, valid) datasets of train_iters global batches and `validation_samples(args)`.

    valid is None when eval_iters is 0 or --split gives it no share. The test share of --split
    is held out: it moves the train/valid boundaries exactly as in Megatron-LM but is never
    built, since nothing here reads it.

    Collective when torch.distributed is initialised: every rank of the default group must call
    it. megatron's builder lets global rank 0 write the index cache, barriers, then the other
    ranks read it (`BlendedMegatronDatasetBuilder.build_generic_dataset`).
    """
    config = build_dataset_config(args, tokenizer)
    wanted = {Split.train: True, Split.valid: args.eval_iters > 0, Split.test: False}
    config.split_matrix = [b if wanted[s] else None for s, b in zip(Split, config.split_matrix)]
    if config.split_matrix[Split.train.value] is None:
        raise DataConfigError(f"--split {args.split!r} gives the train split no share")
    _check_split_documents(config, args)
    _ensure_dataset_helpers()
    sizes = [args.train_iters * args.global_batch_size, validation_samples(args), 0]
    cls = MockGPTDataset if config.mock else GPTDataset
    builds_blend = not config.mock and (len(config.blend[0]) > 1 or config.blend[1] is not None)
    needs_group = builds_blend and config.path_to_cache is not None and not torch.distributed.is_initialized()
    with _single_process_group() if needs_group else contextlib.nullcontext():
        train, valid, _ = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()
    return train, valid


def _ensure_dataset_helpers() -> None:
    """megatron's C++ index builders: compiled in the wheel; a source checkout builds them once.

    As Megatron-LM's initialisation does, global rank 0 compiles (`make` in megatron's datasets
    directory) while the other ranks wait at a barrier.
    """
    try:
        import megatron.core.datasets.helpers_cpp  # noqa: F401
        return
    except ImportError:
        pass
    distributed = torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        compile_helpers()
    if distributed:
        torch.distributed.barrier()
    # Compiled just now: only importable after compile_helpers().
    import megatron.core.datasets.helpers_cpp  # noqa: F401,F811


@contextlib.contextmanager
def _single_process_group() -> Iterator[None]:
    """A throw-away 1-process gloo group for building outside torch.distributed.

    megatron-core 0.16.1's BlendedDataset calls torch.distributed.get_rank() on a cache miss
    without checking that torch.distributed is initialised (blended_dataset.py:153), unlike
    GPTDataset; Megatron-LM never hits this because it always initialises torch.distributed.
    """
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Sampling and iteration
# ----------------------------------------------------------------------------------------------


class PretrainingSampler:
    """Megatron-LM's `MegatronPretrainingSampler`: sequential micro-batches of sample indices.

    Indices `consumed_samples, consumed_samples + 1, ...` are cut into chunks of
    micro_batch_size * data_parallel_size; DP rank r takes slice r of each chunk. The dataset
    itself is already shuffled (GPTDataset's seeded shuffle index), so resuming is just starting
    from the consumed-samples counter. An incomplete last chunk is dropped.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int) -> None:
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise DataConfigError(
                f"micro_batch_size ({micro_batch_size}) and data_parallel_size ({data_parallel_size}) must be positive"
            )
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise DataConfigError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        chunk = micro_batch_size * data_parallel_size
        if consumed_samples < 0 or consumed_samples % chunk:
            raise DataConfigError(
                f"consumed_samples {consumed_samples} is not a non-negative multiple of "
                f"micro_batch_size*data_parallel_size = {chunk}"
            )
        if consumed_samples > total_samples:
            raise DataConfigError(f"consumed_samples {consumed_samples} exceeds the dataset's {total_samples} samples")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size

    def __len__(self) -> int:
        """Micro-batches this rank will yield."""
        chunk = self.micro_batch_size * self.data_parallel_size
        return (self.total_samples - self.consumed_samples) // chunk

    def __iter__(self) -> Iterator[list[int]]:
        chunk = self.micro_batch_size * self.data_parallel_size
        first = self.data_parallel_rank * self.micro_batch_size
        for start in range(self.consumed_samples, self.total_samples - chunk + 1, chunk):
            yield list(range(start + first, start + first + self.micro_batch_size))


def build_data_loader(dataset: Dataset, total_samples: int, consumed_samples: int, micro_batch_size: int,
                      dp_rank: int, dp_size: int, num_workers: int) -> DataLoader:
    sampler = PretrainingSampler(total_samples, consumed_samples, micro_batch_size, dp_rank, dp_size)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      persistent_workers=num_workers > 0)


def _validation_batches(dataset: Dataset, total_samples: int, consumed_samples: int, micro_batch_size: int,
                        dp_rank: int, dp_size: int, num_workers: int) -> Iterator[Batch]:
    """Validation micro-batches from sample `consumed_samples` on; after `total_samples` (rounded
    down to whole micro_batch_size * dp_size chunks) they start again at sample 0. Bad counts
    fail here, when the iterator is built, not at the first evaluation."""
    chunk = micro_batch_size * dp_size
    total = total_samples - total_samples % chunk
    if total <= 0:
        raise DataConfigError(f"the validation split has {total_samples} samples, fewer than "
                              f"micro_batch_size * data-parallel size = {chunk}")
    first = build_data_loader(dataset, total, consumed_samples % total, micro_batch_size, dp_rank, dp_size,
                              num_workers)

    def batches() -> Iterator[Batch]:
        yield from first
        while True:
            yield from build_data_loader(dataset, total, 0, micro_batch_size, dp_rank, dp_size, num_workers)

    return batches()


def build_pretrain_data_iterators(
    args: argparse.Namespace, tokenizer: Any, consumed_samples: int, dp_rank: int, dp_size: int,
    consumed_valid_samples: int = 0,
) -> tuple[Iterator[Batch], Optional[Iterator[Batch]]]:

    """(train_iter, valid_iter) yielding this DP rank's micro-batches as dicts of CPU tensors.

    Each batch holds `tokens`, `labels` (int64 [mbs, seq]), `loss_mask` (float [mbs, seq]),
    `position_ids` ([mbs, seq]) and, unless `create_attention_mask_in_dataloader=False`,
    `attention_mask` (bool [mbs, 1, seq, seq], True = masked out, megatron's convention).
    train_iter starts after `consumed_samples` global samples (a multiple of mbs*dp, normally
    iteration * global_batch_size), so a resumed run sees exactly the batches the original would
    have. valid_iter does the same for validation, like Megatron-LM's: it starts after
    `consumed_valid_samples` (evaluations so far * eval_iters * global_batch_size), so each
    evaluation scores the next eval_iters global batches and a resumed run scores the ones the
    original would have; after the `validation_samples(args)` a run reads (Megatron-LM's size of
    the validation dataset) it starts again from the first. valid_iter is None when eval_iters is
    0 or --split gives validation no share. Collective under torch.distributed (see
    build_pretrain_datasets).
    """
    if args.global_batch_size % (args.micro_batch_size * dp_size):
        raise DataConfigError(
            f"global_batch_size {args.global_batch_size} is not a multiple of "
            f"micro_batch_size {args.micro_batch_size} * data-parallel size {dp_size}"
        )
    train_ds, valid_ds = build_pretrain_datasets(args, tokenizer)
    train_loader = build_data_loader(train_ds, len(train_ds), consumed_samples, args.micro_batch_size,
                                     dp_rank, dp_size, args.num_workers)
    valid_iter = None
    if valid_ds is not None:
        valid_iter = _validation_batches(valid_ds, min(validation_samples(args), len(valid_ds)),
                                         consumed_valid_samples, args.micro_batch_size, dp_rank, dp_size,
                                         args.num_workers)
    return iter(train_loader), valid_iter


def get_batch(data_iterator: Iterator[Batch], device: torch.device | str = "cpu") -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Next micro-batch as Megatron-LM's pretrain_gpt `get_batch` returns it:
    (tokens, labels, loss_mask, attention_mask or None, position_ids), on `device`."""
    batch = next(data_iterator)

    def move(key: str) -> Optional[torch.Tensor]:
        return None if batch.get(key) is None else batch[key].to(device, non_blocking=True)

    return move("tokens"), move("labels"), move("loss_mask"), move("attention_mask"), move("position_ids")


def take(iterator: Iterator[Batch], n: int) -> list[Batch]:
    """The next n micro-batches (for evaluation loops and tests)."""
    return list(itertools.islice(iterator, n))
