"""SIGTERM / SIGUSR1 → checkpoint and exit at the next step boundary (Slurm preemption).

The handler only sets a flag; the training loop asks :meth:`should_stop` (collective, so every
rank stops at the same iteration) after each step, saves, and exits with ``EXIT_CODE``.
"""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

EXIT_CODE = 143  # 128 + SIGTERM: what a job script expects from a terminated step


class PreemptionHandler:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)) -> None:
        self._requested = False
        self._signals = signals
        self._previous = {}

    def install(self) -> "PreemptionHandler":
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        if not self._requested:
            log.warning("received signal %d: will checkpoint and exit after this step", signum)
        self._requested = True

    def should_stop(self) -> bool:
        """Collective: True on every rank if any rank was signalled."""
        flag = torch.tensor([1.0 if self._requested else 0.0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()
