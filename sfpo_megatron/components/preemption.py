"""SIGTERM / SIGUSR1 → checkpoint and exit at the next step boundary (Slurm preemption).

The handler only sets a flag; the training loop asks :meth:`should_stop` (collective, so every
rank stops at the same iteration) after each step, saves, and exits with ``EXIT_CODE``.

The signal often goes to the whole process group (a Slurm time limit without ``--signal=B:``,
``kill -TERM -PGID``), so every helper process of the trainer gets it too; one that dies of it
loses the checkpoint. The helpers are kept out of its way: rollout servers and reward workers
run in process groups of their own, and :meth:`PreemptionHandler.deferred` wraps the checkpoint
save, whose helper processes (megatron's dist-checkpoint writers and the results-queue manager
it keeps for the rest of the run) start with these signals blocked, so they never die of them.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.resource_tracker
import signal
from collections.abc import Iterator

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

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Block this handler's signals in the calling thread meanwhile: processes started inside
        inherit the block (across exec too) and so ignore a group-wide SIGTERM for good; this
        process still gets it, through another thread or once unblocked, and stops as usual."""
        # multiprocessing starts its resource tracker on first use, and that unblocks SIGTERM in
        # the calling thread: start it before blocking.
        multiprocessing.resource_tracker.ensure_running()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, self._signals)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()
