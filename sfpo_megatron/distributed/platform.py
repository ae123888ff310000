"""The one platform switch: CUDA + NCCL when a GPU is present, otherwise CPU + gloo.

Every entry point calls :func:`setup_platform` once, before megatron builds anything. No other
module decides between CPU and GPU: they ask :func:`current_platform`, or :func:`gpu_available`
/ :func:`gpu_device` where they may also run outside a trainer (the weight transports, the
weight-update group of the CPU rollout server).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Platform:
    device_type: str  # "cuda" | "cpu"
    backend: str  # "nccl" | "gloo"

    @property
    def is_cuda(self) -> bool:
        return self.device_type == "cuda"

    def device(self) -> torch.device:
        if self.is_cuda:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


_PLATFORM: Platform | None = None


def setup_platform(force_cpu: bool | None = None) -> Platform:
    """Select the platform once per process and prepare torch/megatron for it.

    ``force_cpu`` (or ``SFPO_FORCE_CPU=1``) runs on CPU even on a GPU machine; the CPU path is
    only available there for tests, since the compatibility layer would hide the GPU otherwise.
    """
    global _PLATFORM
    if _PLATFORM is not None:
        return _PLATFORM
    if force_cpu is None:
        force_cpu = os.environ.get("SFPO_FORCE_CPU", "0") == "1"
    if torch.cuda.is_available() and not force_cpu:
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        _PLATFORM = Platform("cuda", "nccl")
    else:
        if torch.cuda.is_available():
            raise RuntimeError("SFPO_FORCE_CPU on a CUDA machine is not supported: the CPU "
                               "compatibility layer would redirect every CUDA call")
        # Imported here: it imports megatron, and the CPU rollout server (which asks
        # gpu_available() for its weight-update group) starts without it.
        from sfpo_megatron.distributed import cpu_compat

        cpu_compat.apply()
        _PLATFORM = Platform("cpu", "gloo")
    return _PLATFORM


def current_platform() -> Platform:
    if _PLATFORM is None:
        raise RuntimeError("setup_platform() has not been called in this process")
    return _PLATFORM


def gpu_available() -> bool:
    """Whether this process computes on a GPU: the platform's choice once set up, else whether
    torch sees CUDA."""
    if _PLATFORM is not None:
        return _PLATFORM.is_cuda
    return torch.cuda.is_available()


def gpu_device() -> torch.device:
    """This process's current GPU (callers check :func:`gpu_available` first)."""
    return torch.device("cuda", torch.cuda.current_device())
