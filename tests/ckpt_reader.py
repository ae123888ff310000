"""Read a torch_dist checkpoint's model tensors in the test process, without megatron.

megatron stores each tensor in its global (layout-independent) form — TP shards merged, layers
stacked — so checkpoints written at different TP/PP/DP layouts compare key by key.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch


def read_model_tensors(path: str | Path, prefix_exclude: tuple[str, ...] = ("optimizer",
                                                                             "rng_state")) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    if not (path / "metadata.json").exists() and (path / "latest_checkpointed_iteration.txt").exists():
        it = int((path / "latest_checkpointed_iteration.txt").read_text())
        path = path / f"iter_{it:07d}"
    meta = FileSystemReader(str(path)).read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in meta.state_dict_metadata.items()
             if isinstance(m, TensorStorageMetadata) and not k.startswith(prefix_exclude)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
        dcp.load(state, storage_reader=FileSystemReader(str(path)), no_dist=True)
    return state
