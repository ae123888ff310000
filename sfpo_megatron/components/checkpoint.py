"""torch_dist checkpoints (megatron ``dist_checkpointing``), written atomically.

Layout (Megatron-LM's, so its tools can read it)::

    <save>/iter_0000042/            one checkpoint: dist_checkpointing files + sfpo_meta.json
    <save>/latest_checkpointed_iteration.txt   the tracker, written last

A save goes to ``iter_XXXXXXX.tmp-<pid>`` and is renamed into place only after every rank has
finished writing and ``sfpo_meta.json`` (the completion marker) exists; the tracker is replaced
atomically after the rename. A crash at any moment therefore leaves the previous checkpoint and
tracker intact. Loading checks the marker and dist_checkpointing's metadata and names what is
missing. The model loads into any TP/PP layout (megatron reshards); the optimizer state is saved
``fully_reshardable`` by default so a different DP size works too; RNG states load only into the
layout they were saved from.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint import FileSystemReader

from sfpo_megatron.distributed.platform import gpu_available
from sfpo_megatron.errors import UserError

log = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
MARKER = "sfpo_meta.json"
FORMAT_VERSION = 1


class CheckpointError(UserError, RuntimeError):
    """A missing, partial, corrupt or mismatched checkpoint."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> int | None:
    """Iteration named by the tracker, or None when ``root`` holds no checkpoint yet."""
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError as e:
        raise CheckpointError(f"checkpoint tracker {path} is corrupt: {text!r}") from e


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def validate_checkpoint_dir(path: str) -> dict:
    """Returns the completion marker's contents or raises naming what is wrong."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    marker = os.path.join(path, MARKER)
    if not os.path.exists(marker):
        raise CheckpointError(f"checkpoint {path} is partial: completion marker {MARKER} missing")
    try:
        meta = json.load(open(marker))
    except (json.JSONDecodeError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: cannot read {MARKER}: {e}") from e
    if not os.path.exists(os.path.join(path, "metadata.json")):
        raise CheckpointError(f"checkpoint {path} is corrupt: dist_checkpointing metadata.json "
                              "missing")
    for name in meta.get("files", []):
        if not os.path.exists(os.path.join(path, name)):
            raise CheckpointError(f"checkpoint {path} is corrupt: file {name} missing")
    return meta


def _layout() -> tuple[int, int, int]:
    return (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
            ps.get_data_parallel_rank())


def _layout_sizes() -> tuple[int, int, int]:
    return (ps.get_pipeline_model_parallel_world_size(),
            ps.get_tensor_model_parallel_world_size(), ps.get_data_parallel_world_size())


def rng_state() -> dict[str, Any]:
    return {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if gpu_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and gpu_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state: dict | None):
    return ShardedObject("rng_state", state, _layout_sizes(), _layout(), replica_id=0)


def _model_sharded_state_dict(model_chunks: list) -> dict:
    out = {}
    for i, chunk in enumerate(model_chunks):
        module = getattr(chunk, "module", chunk)
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        out[key] = module.sharded_state_dict()
    return out


def _optim_metadata(sharding: str) -> dict:
    return {"distrib_optim_sharding_type": sharding}


@dataclass
class LoadResult:
    iteration: int
    extra_state: dict
    loaded_optimizer: bool
    loaded_rng: bool


def save_checkpoint(root: str, iteration: int, model_chunks: list, optimizer=None,
                    scheduler=None, extra_state: dict | None = None,
                    optim_sharding: str = "fully_reshardable", keep_last: int | None = None) -> str:
    """Collective: every trainer rank calls it. Returns the final checkpoint directory."""
    final = iter_dir(root, iteration)
    tmp = f"{final}.tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    state: dict[str, Any] = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=False, metadata=_optim_metadata(optim_sharding))
    state["rng_state"] = _rng_sharded_object(rng_state())
    state["iteration"] = iteration
    state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    state["extra_state"] = extra_state or {}
    state["layout"] = list(_layout_sizes())
    dist_checkpointing.save(state, tmp, sharded_strategy=get_default_save_sharded_strategy())
    _barrier()
    if _rank() == 0:
        files = sorted(os.listdir(tmp))
        meta = {"format_version": FORMAT_VERSION, "iteration": iteration,
                "layout_pp_tp_dp": list(_layout_sizes()), "files": files,
                "optim_sharding": optim_sharding if optimizer is not None else None}
        _atomic_write(os.path.join(tmp, MARKER), json.dumps(meta, indent=1))
        _fsync_dir(tmp)
        if os.path.exists(final):
            # Re-saving the same iteration (e.g. after a resume): replace it atomically enough —
            # the tracker still points at a complete directory until the rename below.
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        _atomic_write(os.path.join(root, TRACKER), str(iteration))
        if keep_last:
            _prune(root, keep_last)
    _barrier()
    return final


def _prune(root: str, keep_last: int) -> None:
    its = sorted(int(d[5:]) for d in os.listdir(root)
                 if d.startswith("iter_") and d[5:].isdigit())
    for it in its[:-keep_last]:
        shutil.rmtree(iter_dir(root, it), ignore_errors=True)


def resolve_load_dir(root: str) -> tuple[str, int] | None:
    """(directory, iteration) of the checkpoint to load from ``root``, or None if it is empty.

    ``root`` may also name an ``iter_XXXXXXX`` directory directly.
    """
    base = os.path.basename(os.path.normpath(root))
    if base.startswith("iter_") and base[5:].isdigit():
        validate_checkpoint_dir(root)
        return root, int(base[5:])
    it = read_tracker(root)
    if it is None:
        # A crash between the rename and the tracker write leaves a complete directory and no
        # tracker: take the newest complete one. Unfinished ``.tmp`` saves never count.
        complete = [] if not os.path.isdir(root) else sorted(
            int(d[5:]) for d in os.listdir(root) if d.startswith("iter_") and d[5:].isdigit()
            and os.path.exists(os.path.join(root, d, MARKER)))
        if not complete:
            return None
        it = complete[-1]
    path = iter_dir(root, it)
    validate_checkpoint_dir(path)
    return path, it


def _check_model_shapes(path: str, state: dict) -> None:
    """A model tensor whose global shape differs from the checkpoint's (another architecture,
    another vocab padding) must fail by name, not load silently wrong."""
    stored = FileSystemReader(path).read_metadata().state_dict_metadata
    for key in [k for k in state if k.startswith("model")]:
        for sh in nested_values(state[key]):
            if not isinstance(sh, ShardedTensor) or sh.key not in stored:
                continue
            saved = tuple(getattr(stored[sh.key], "size", ()))
            if saved and saved != tuple(sh.global_shape):
                raise CheckpointError(
                    f"checkpoint {path} does not match the model: tensor {sh.key} has shape "
                    f"{list(saved)} in the checkpoint and {list(sh.global_shape)} in the model")


def load_checkpoint(root: str, model_chunks: list, optimizer=None, scheduler=None,
                    load_optim: bool = True, load_rng: bool = True,
                    strict: bool = True) -> LoadResult | None:
    """Collective load; returns None when ``root`` holds no checkpoint (a fresh start)."""
    found = resolve_load_dir(root)
    if found is None:
        return None
    path, iteration = found
    meta = validate_checkpoint_dir(path)
    same_layout = list(meta.get("layout_pp_tp_dp", [])) == list(_layout_sizes())
    has_optim = meta.get("optim_sharding") is not None
    load_optim = load_optim and optimizer is not None and has_optim
    if load_optim and meta["optim_sharding"] == "dp_reshardable" and not same_layout:
        raise CheckpointError(
            f"checkpoint {path} holds dp_reshardable optimizer state for layout "
            f"(pp,tp,dp)={meta['layout_pp_tp_dp']}, not {list(_layout_sizes())}: load with "
            "--no-load-optim or save with --dist-ckpt-optim-sharding fully_reshardable")
    load_rng = load_rng and same_layout
    state: dict[str, Any] = _model_sharded_state_dict(model_chunks)
    if load_optim:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=True, metadata=_optim_metadata(meta["optim_sharding"]))
    if load_rng:
        state["rng_state"] = _rng_sharded_object(None)
    # Keys the checkpoint has but we do not ask for (RNG or optimizer state skipped on purpose)
    # are fine; a key we ask for that the checkpoint lacks still fails inside load().
    handling = StrictHandling.ASSUME_OK_UNEXPECTED if strict else StrictHandling.LOG_UNEXPECTED
    _check_model_shapes(path, state)
    try:
        loaded = dist_checkpointing.load(state, path, strict=handling)
    except Exception as e:  # noqa: BLE001 - re-raised with the checkpoint named
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from e
    if isinstance(loaded, tuple):
        loaded = loaded[0]
    for i, chunk in enumerate(model_chunks):
        module = getattr(chunk, "module", chunk)
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        module.load_state_dict(loaded[key], strict=True)
    if load_optim:
        with torch.no_grad():  # fp32 params: the copy into main params must not be tracked
            optimizer.load_state_dict(loaded["optimizer"])
        if scheduler is not None and loaded.get("scheduler") is not None:
            scheduler.load_state_dict(loaded["scheduler"])
    if load_rng and loaded.get("rng_state") is not None:
        set_rng_state(loaded["rng_state"])
    elif not same_layout:
        log.info("checkpoint %s was saved with layout (pp,tp,dp)=%s; RNG state not restored",
                 path, meta.get("layout_pp_tp_dp"))
    return LoadResult(iteration=iteration, extra_state=loaded.get("extra_state") or {},
                      loaded_optimizer=load_optim, loaded_rng=load_rng)
