"""torch.distributed + megatron ``parallel_state`` from torchrun's or Slurm's environment."""

from __future__ import annotations

import datetime
import logging
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from sfpo_megatron.distributed.platform import setup_platform
from sfpo_megatron.errors import UserError

log = logging.getLogger(__name__)


class LayoutError(UserError):
    """An impossible parallel layout or batch configuration, caught before anything is built."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_dist_env() -> DistEnv:
    """Rank and world from torchrun (RANK/WORLD_SIZE), else Slurm (SLURM_PROCID/NTASKS), else 1."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", "0"))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", "0"))
    else:
        rank, world, local = 0, 1, 0
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" in env:
        port = int(env["MASTER_PORT"])
    elif world == 1:
        port = _free_port()
    elif "SLURM_JOB_ID" in env:
        # srun without torchrun: every task derives the same port from the job id.
        port = 20000 + int(env["SLURM_JOB_ID"]) % 20000
    else:
        raise RuntimeError("MASTER_PORT is not set for a multi-process run (use torchrun or srun)")
    return DistEnv(rank, world, local, addr, port)


def check_layout(*, world_size: int, tp: int, pp: int, num_layers: int, num_attention_heads: int,
                 num_query_groups: int, micro_batch_size: int, global_batch_size: int | None,
                 vpp: int | None = None, cp: int = 1, ep: int = 1, etp: int | None = None,
                 num_experts: int = 0) -> int:
    """Validate a layout; returns the data-parallel size. Errors name the numbers involved.
    ``ep`` / ``etp``: expert-(tensor-)parallel sizes; ``num_experts`` 0 is a dense model."""
    for name, value in (("tensor-model-parallel-size", tp), ("pipeline-model-parallel-size", pp),
                        ("micro-batch-size", micro_batch_size)):
        if value < 1:
            raise LayoutError(f"--{name} must be >= 1, got {value}")
    if world_size % (tp * pp * cp) != 0:
        raise LayoutError(
            f"world size {world_size} is not a multiple of tensor-model-parallel-size {tp} x "
            f"pipeline-model-parallel-size {pp}" + (f" x context-parallel-size {cp}" if cp > 1 else "")
            + f" = {tp * pp * cp}")
    if num_attention_heads % tp != 0:
        raise LayoutError(f"tensor-model-parallel-size {tp} does not divide the number of "
                          f"attention heads {num_attention_heads}")
    if num_query_groups % tp != 0:
        raise LayoutError(f"tensor-model-parallel-size {tp} does not divide the number of "
                          f"key/value heads {num_query_groups}")
    stages = pp * (vpp or 1)
    if num_layers % stages != 0:
        raise LayoutError(f"pipeline-model-parallel-size {pp}"
                          + (f" x virtual-pipeline-model-parallel-size {vpp}" if vpp else "")
                          + f" does not divide the number of layers {num_layers}")
    check_expert_layout(world_size=world_size, tp=tp, pp=pp, ep=ep, etp=etp,
                        num_experts=num_experts)
    dp = world_size // (tp * pp * cp)
    if global_batch_size is not None and global_batch_size % (micro_batch_size * dp) != 0:
        raise LayoutError(
            f"global-batch-size {global_batch_size} is not divisible by micro-batch-size "
            f"{micro_batch_size} x data-parallel-size {dp} = {micro_batch_size * dp}")
    return dp


def check_expert_layout(*, world_size: int, tp: int, pp: int, ep: int = 1, etp: int | None = None,
                        num_experts: int | None = None) -> None:
    """The expert-parallel part of a layout (``num_experts`` None: not known here)."""
    etp = tp if etp is None else etp
    for name, value in (("expert-model-parallel-size", ep), ("expert-tensor-parallel-size", etp)):
        if value < 1:
            raise LayoutError(f"--{name} must be >= 1, got {value}")
    if num_experts is not None:
        if ep > 1 and num_experts == 0:
            raise LayoutError(f"expert-model-parallel-size {ep} needs a mixture-of-experts "
                              "model; this model has no experts")
        if num_experts and num_experts % ep:
            raise LayoutError(f"expert-model-parallel-size {ep} does not divide the number of "
                              f"experts {num_experts}")
    # megatron lays the experts out as expert-TP x EP x expert-DP x PP over the same ranks
    if world_size % (etp * ep * pp):
        raise LayoutError(
            f"world size {world_size} is not a multiple of expert-tensor-parallel-size {etp} x "
            f"expert-model-parallel-size {ep} x pipeline-model-parallel-size {pp} = "
            f"{etp * ep * pp}")


def set_seed(seed: int) -> None:
    """Megatron-LM's seeding: distinct per pipeline stage, identical across TP/DP ranks."""
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def initialize(tp: int = 1, pp: int = 1, vpp: int | None = None, seed: int = 1234,
               timeout_minutes: int = 30, cp: int = 1, ep: int = 1,
               etp: int | None = None) -> DistEnv:
    """Initialise torch.distributed and megatron's parallel groups (idempotent); ``ep`` /
    ``etp``: expert-(tensor-)parallel sizes."""
    platform = setup_platform()
    env = read_dist_env()
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(
            backend=platform.backend, rank=env.rank, world_size=env.world_size,
            init_method=f"tcp://{env.master_addr}:{env.master_port}", timeout=timeout)
        if env.rank == 0:
            log.info("process group: %s, world size %d, TP %d, PP %d, collective timeout %s",
                     platform.backend, env.world_size, tp, pp, timeout)
    if env.world_size % (tp * pp * cp) != 0:
        raise LayoutError(
            f"world size {env.world_size} is not a multiple of tensor-model-parallel-size {tp} x "
            f"pipeline-model-parallel-size {pp}" + (f" x context-parallel-size {cp}" if cp > 1 else "")
            + f" = {tp * pp * cp}")
    check_expert_layout(world_size=env.world_size, tp=tp, pp=pp, ep=ep, etp=etp)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp,
            expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
            distributed_timeout_minutes=timeout_minutes)
    set_seed(seed)
    return env


def destroy() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
