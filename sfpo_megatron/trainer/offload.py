"""``--offload-train``: the trainer's device state in pinned host memory while colocated rollout
servers generate on the same GPUs.

What moves, with megatron-core's own calls: DDP's parameter and gradient buffers
(``_ParamAndGradBuffer.offload_to_cpu`` / ``reload_from_cpu``: the storage is resized to 0 and
back, so every parameter and ``main_grad`` view stays valid; gradients come back zeroed, which is
what the next update starts from) and the optimizer's fp32 main params and Adam moments
(``MegatronOptimizer.offload_to_cpu`` / ``restore_from_cpu``). Without the distributed optimizer
DDP keeps no parameter buffer, so the model parameters move one by one (``.data`` swapped to a
pinned host copy and back); ``--offload-train`` never changes a number, only where it lives.

Not moved: the frozen reference model of ``--kl-coef`` and non-parameter buffers (small), and
nothing of SFPO (its θ0 snapshot lives only inside an update).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)


def _buffers(chunk) -> list:
    return list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", []))


class TrainStateOffload:
    """Moves one rank's trainer state to the host (``to_host``) and back (``to_device``)."""

    def __init__(self, model_chunks: Sequence, optimizer) -> None:
        self.model_chunks = list(model_chunks)
        self.optimizer = optimizer
        self.on_host = False
        self._loose: list[tuple[torch.nn.Parameter, torch.device]] = []

    def _loose_params(self) -> list[torch.nn.Parameter]:
        """Parameters that no DDP parameter buffer holds (all of them without the distributed
        optimizer, whose buffers keep no parameter copy)."""
        in_buffer = set()
        for chunk in self.model_chunks:
            for buf in _buffers(chunk):
                if buf.param_data is not None:
                    in_buffer.update(id(p) for p in buf.params)
        return [p for c in self.model_chunks for p in c.parameters() if id(p) not in in_buffer]

    def to_host(self) -> int:
        """Free this rank's device copies; returns the device bytes released."""
        if self.on_host:
            return 0
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        # The optimizer first: with fp32 params and the distributed optimizer its main params are
        # views of the parameter buffer, read before the buffer's storage goes.
        self.optimizer.offload_to_cpu()
        self._loose = []
        for p in self._loose_params():
            if p.is_cuda:  # FP32Optimizer's main params are these: already moved above
                self._loose.append((p, p.device))
                p.data = p.data.to("cpu").pin_memory()
        for chunk in self.model_chunks:
            for buf in _buffers(chunk):
                buf.offload_to_cpu(move_params=True, move_grads=True)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        self.on_host = True
        freed = before - torch.cuda.memory_allocated()
        log.info("--offload-train: %.2f GiB of trainer state moved to host memory", freed / 2**30)
        return freed

    def to_device(self) -> None:
        if not self.on_host:
            return
        for p, device in self._loose:
            p.data = p.data.to(device, non_blocking=True)
        self._loose = []
        for chunk in self.model_chunks:
            for buf in _buffers(chunk):
                buf.reload_from_cpu(move_params=True, move_grads=True)
        self.optimizer.restore_from_cpu()  # the main params it moved, and the Adam moments
        torch.cuda.synchronize()
        self.on_host = False
