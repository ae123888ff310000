"""The fp32 main parameters of megatron's optimizers: snapshot, distance, reposition, copy back.

Where the main parameters live (the three megatron optimizers, all reached through
``optimizer.optimizer.param_groups``, i.e. exactly what Adam updates):

* ``FP32Optimizer`` (fp32 params, no distributed optimizer): the model parameters themselves;
* ``Float16OptimizerWithFloat16Params`` (``--bf16``): fp32 copies of the bf16 model params, copied
  back by ``_copy_main_params_to_model_params``;
* ``DistributedOptimizer``: this DP rank's fp32 shard (a view of the param buffer with fp32
  params, an fp32 copy with bf16), written into the param buffer by
  ``_copy_main_params_to_model_params`` and all-gathered by ``DistributedDataParallel.
  start_param_sync`` — the same calls megatron makes after ``optimizer.step()``. With
  ``--optimizer-cpu-offload`` (GPU) its Adam is megatron's HybridDeviceOptimizer, which steps
  host copies of the shard: a reposition is copied to them as well.

Mixture-of-experts models get a ``ChainedOptimizer`` whose second optimizer holds the expert
parameters (their own grad buffers, reduced over the expert-data-parallel group): everything here
walks every inner optimizer, so the experts' main-param shards are snapshotted and repositioned
too, and their distance is reduced over that optimizer's own grad-stats group.

So a snapshot costs one copy of the main-param shard (4 bytes / parameter / DP size, in host
memory with offload) and a reposition no communication beyond the ordinary all-gather.

Distances are global: squared sums over main params that are neither TP duplicates nor the PP
copy of tied embeddings (megatron's grad-norm rule), all-reduced over the optimizer's grad-stats
group (model-parallel group, or the world for the distributed optimizer).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from sfpo_megatron.distributed.platform import current_platform
from sfpo_megatron.errors import UserError


class MainParamError(UserError):
    """An optimizer layout whose main params cannot be repositioned."""


def inner_optimizers(optimizer) -> list:
    """The megatron optimizers inside a ``ChainedOptimizer`` (or the optimizer itself)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def main_params(opt) -> list[torch.Tensor]:
    """The fp32 parameters the inner (Adam) optimizer updates on this rank."""
    if getattr(opt, "is_stub_optimizer", False) or opt.optimizer is None:
        return []
    return [p for group in opt.optimizer.param_groups for p in group["params"]]


def check_supported(optimizer) -> None:
    """Stage II needs the main params in ``param_groups``; refuse layouts where they are not."""
    for opt in inner_optimizers(optimizer):
        if not isinstance(opt, (DistributedOptimizer, Float16OptimizerWithFloat16Params,
                                FP32Optimizer)):
            raise MainParamError(f"SFPO reposition does not support {type(opt).__name__}")
        if getattr(opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False):
            raise MainParamError("SFPO reposition does not support the precision-aware "
                                    "optimizer (main params live inside TE FusedAdam)")
        ddp_config = getattr(opt, "ddp_config", None)
        if ddp_config is not None and getattr(ddp_config, "use_megatron_fsdp", False):
            raise MainParamError("SFPO reposition does not support megatron FSDP")


def _counts_for_norm(opt, p: torch.Tensor) -> bool:
    return param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(
        p, getattr(opt, "tp_group", None))


def _snapshot_copy(p: torch.Tensor, offload: bool) -> torch.Tensor:
    if not offload or p.device.type == "cpu":
        return p.detach().clone()
    # Pinned host memory so the copies back (Stage II) are asynchronous DMA.
    host = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=True)
    host.copy_(p.detach(), non_blocking=True)
    return host


class MainParamSnapshot:
    """θ(s,0): a copy of this rank's main params (its shard with the distributed optimizer)."""

    def __init__(self, optimizer, offload: bool = False) -> None:
        self.groups = []
        with torch.no_grad():
            for opt in inner_optimizers(optimizer):
                params = main_params(opt)
                self.groups.append((opt, params, [_snapshot_copy(p, offload) for p in params]))

    @property
    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for _, _, copies in self.groups for c in copies)

    @torch.no_grad()
    def distance(self) -> float:
        """‖θ − θ(s,0)‖ over the whole model (all DP / TP / PP ranks); collective."""
        total = 0.0
        for opt, params, copies in self.groups:
            sq = torch.zeros((), dtype=torch.float64, device=current_platform().device())
            for p, p0 in zip(params, copies):
                if _counts_for_norm(opt, p):
                    d = torch.linalg.vector_norm(p - p0.to(p.device, non_blocking=True))
                    sq += d.double().square()
            if dist.is_initialized():
                dist.all_reduce(sq, group=opt.get_grad_stats_parallel_group())
            total += float(sq)
        return math.sqrt(total)

    @torch.no_grad()
    def reposition_(self, alpha: float) -> None:
        """Main params ← lerp(θ(s,0), θ, α) in place (exact at α = 0 and 1)."""
        for opt, params, copies in self.groups:
            for p, p0 in zip(params, copies):
                p.copy_(torch.lerp(p0.to(p.device, non_blocking=True), p, alpha))
            _sync_host_copies(opt)


def _sync_host_copies(opt) -> None:
    """``--optimizer-cpu-offload``: megatron's HybridDeviceOptimizer steps host copies of the
    main params and copies them back to the device after each step, so the host copies are
    the truth the next step starts from: a reposition must reach them too."""
    hybrid = getattr(opt, "optimizer", None)
    for device_param, host_param in getattr(hybrid, "gpu_params_map_cpu_copy", {}).items():
        host_param.copy_(device_param)


@torch.no_grad()
def copy_main_to_model_params(optimizer) -> None:
    """What megatron does after ``optimizer.step()``: main → model params, then (distributed
    optimizer) the DP all-gather of the param buffers — synchronous, or left to the next
    forward's pre-hooks when ``--overlap-param-gather`` is on (as after a step)."""
    gather_chunks: dict[int, Any] = {}
    for opt in inner_optimizers(optimizer):
        if isinstance(opt, (DistributedOptimizer, Float16OptimizerWithFloat16Params)):
            if not opt.is_stub_optimizer:
                if opt.config.reuse_grad_buf_for_mxfp8_param_ag:
                    if not opt.config.overlap_param_gather:
                        opt._copy_main_params_to_param_buffer()
                else:
                    opt._copy_main_params_to_model_params()
        # FP32Optimizer: the main params are the model params, already in place.
        if isinstance(opt, DistributedOptimizer) and not opt.ddp_config.overlap_param_gather:
            for chunk in opt.model_chunks:
                gather_chunks[id(chunk)] = chunk
    for chunk in gather_chunks.values():
        chunk.start_param_sync()


@torch.no_grad()
def finish_param_gather(optimizer) -> None:
    """With ``--overlap-param-gather`` megatron leaves the all-gather after a step to the next
    forward's pre-hooks; run it now so readers of the model params (refit, checkpoint) see
    θ(s+1,0). The next forward then finds the buckets gathered and sends nothing again."""
    chunks: dict[int, Any] = {}
    for opt in inner_optimizers(optimizer):
        if isinstance(opt, DistributedOptimizer) and opt.ddp_config.overlap_param_gather:
            for chunk in opt.model_chunks:
                chunks[id(chunk)] = chunk
    for chunk in chunks.values():
        chunk.start_param_sync(force_sync=True)


@contextlib.contextmanager
def scaled_lr(optimizer, scale: float) -> Iterator[None]:
    """Every param group's lr × ``scale`` for one ``optimizer.step()``, restored exactly after
    (the saved values are put back, so scale 1.0 and the round trip are bit-exact)."""
    if scale == 1.0:
        yield
        return
    groups = optimizer.param_groups
    saved = [g["lr"] for g in groups]
    for g in groups:
        g["lr"] = g["lr"] * scale
    try:
        yield
    finally:
        for g, lr in zip(groups, saved):
            g["lr"] = lr
