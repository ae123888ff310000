"""The weight-update process group with SGLang's handshake: the trainer's transport and the CPU
rollout server both join it, so this lives below both."""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

from sfpo_megatron.distributed.platform import gpu_available, gpu_device
from sfpo_megatron.errors import UserError

DEFAULT_GROUP_NAME = "weight_update_group"


class WeightUpdateGroupError(UserError, RuntimeError):
    """The group cannot be formed as asked (e.g. NCCL without CUDA)."""


def init_weight_update_group(
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str = DEFAULT_GROUP_NAME,
    backend: str = "gloo",
    timeout_s: float = 600.0,
) -> dist.ProcessGroup:
    """Join the weight-update group exactly as SGLang's servers do.

    SGLang (and the trainers that drive it) rendezvous through a TCP store at
    ``master_address:master_port`` hosted by rank 0, namespace it with
    ``PrefixStore(group_name)`` and build a standalone process group that leaves the default group
    (the trainer's megatron world) untouched. Matching that key layout is what lets this trainer talk
    to real SGLang and SGLang-style trainers talk to the CPU server. torch has no public API for a
    second "world" group, hence the private helper (same as SGLang, OpenRLHF, verl).

    The store is a ``TCPStore`` made here, hosted by rank 0 — not ``rendezvous("tcp://...")``,
    which under torchrun (``TORCHELASTIC_USE_AGENT_STORE``) joins the elastic agent's store as a
    client even on rank 0, so nobody would host this group's store.
    """
    if not group_name:
        raise ValueError("group_name must be a non-empty string")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the group's world_size {world_size}")
    if backend == "nccl" and not gpu_available():
        raise WeightUpdateGroupError(
            "backend 'nccl' needs CUDA, and torch.cuda.is_available() is False here; use backend 'gloo'"
        )
    timeout = datetime.timedelta(seconds=timeout_s)
    # multi_tenant: one process may host several groups' stores on the same port.
    store = dist.TCPStore(master_address, master_port, world_size, rank == 0, timeout=timeout, multi_tenant=True)
    store = PrefixStore(group_name, store)
    extra: dict[str, Any] = {}
    if backend == "nccl":
        # Eager NCCL init: otherwise the first broadcast, not this call, would do the rendezvous.
        extra["device_id"] = gpu_device()
    pg, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), store, group_name=group_name, timeout=timeout, **extra
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def destroy_weight_update_group(pg: dist.ProcessGroup) -> None:
    dist.destroy_process_group(pg)


def dtype_name(dtype: torch.dtype) -> str:
    """The dtype string SGLang expects in ``dtypes`` ("bfloat16", "float32", ...)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    """Inverse of ``dtype_name``; also accepts the ``torch.`` prefix. ValueError names bad input."""
    attr = name.removeprefix("torch.") if isinstance(name, str) else None
    dtype = getattr(torch, attr, None) if attr else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype
