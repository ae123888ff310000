"""Asynchronous rollouts (``--async-rollout --max-staleness k``): global rank 0 generates the next
rollout batches in a background thread while the trainer ranks train on the current one.

Versions and staleness. Step s trains the weights of version s − 1 (a fresh run refits version s
after step s). The producer submits the prompts of batch s only once the servers hold a version
≥ s − 1 − k (it waits on :meth:`AsyncRolloutProducer.weights_updated`, called after every refit),
and versions only grow, so every response of batch s — each carries the ``weight_version`` the
server generated it with — is at most k versions older than the weights it is trained on. The
trainer checks it again when it takes the batch (:func:`check_staleness`). A server refit waits
for its running batch to drain (SGLang's default, and the CPU server's), so one response never
mixes versions; one batch may (the refit can land between two server batches).

So the producer runs at most k + 1 batches ahead of the trainer (k finished and waiting, one in
flight): PipelineRL's maximum sampler–learner lag k. With k = 0 it waits for every refit: the
synchronous schedule through the asynchronous code path.

Which version a batch gets depends on timing, though: batch s starts at whatever version ≥ s − 1 − k
the servers hold when the producer gets to it, and a refit may land in the middle of it. The exact
schedule (``--async-exact-staleness``) removes the timing: before the trainer refits to version v
(after step v) it waits (:meth:`AsyncRolloutProducer.wait_until_produced`) until the producer has
finished batch v + k (or the run's last batch, or the producer failed or was closed). No refit then
lands inside a batch, and batch v + k + 1, which needs version v, starts once v is there and
finishes before v + 1 can be: every batch s is generated entirely with version max(0, s − 1 − k).
With deterministic rollouts a run is then a function of its seeds, and a killed-and-resumed run
equals an uninterrupted one (a checkpoint after step c is written at version c with batches
c + 1 .. c + k queued; a partial batch c + k + 1 is regenerated at version c). The cost: no
generation overlaps a refit, and the trainer idles whenever generating k + 1 batches ahead is
slower than training, where the default schedule would refit early and let batches run fresher.

Checkpoints. :meth:`AsyncRolloutProducer.state_dict` holds the finished batches that were not
trained yet (plain lists: token ids, logprobs, versions, rewards, advantages) and the sampler
position from which the producer must continue (the start of the batch in flight, whose partial
results are dropped). ``start_sampler`` is where a *synchronous* resume must start: the first
prompt not yet trained. A run killed and restarted with the same command therefore trains
every drawn prompt exactly once: nothing lost, nothing twice.

Only this thread talks to the servers' ``/generate`` and the reward workers; the main thread
refits, evaluates (both HTTP, thread-safe client sessions) and runs every collective.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from sfpo_megatron.records import RolloutBatch, Sample

log = logging.getLogger("sfpo_megatron.rollout.async")

_STATE_VERSION = 1


class StalenessError(RuntimeError):
    """A sample older than --max-staleness versions reached the update (a scheduling bug)."""


class ProducerStopped(RuntimeError):
    """The producer was closed while the trainer still waited for a batch."""


def check_staleness(versions: list[int], trained_version: int, max_staleness: int, step: int) -> None:
    oldest = min(versions)
    if trained_version - oldest > max_staleness:
        raise StalenessError(f"step {step} trains weights version {trained_version} on a sample of "
                             f"version {oldest}: staleness {trained_version - oldest} > --max-staleness "
                             f"{max_staleness}")
    if max(versions) > trained_version:
        raise StalenessError(f"step {step}: sample version {max(versions)} is newer than the trained "
                             f"weights {trained_version}")


def staleness_metrics(versions: list[int], trained_version: int, max_staleness: int) -> dict[str, float]:
    """Mean / max staleness and the histogram (fraction of samples per staleness 0..k)."""
    lags = [trained_version - v for v in versions]
    out = {"async/staleness_mean": sum(lags) / len(lags), "async/staleness_max": float(max(lags)),
           "async/staleness_min": float(min(lags))}
    for j in range(max_staleness + 1):
        out[f"async/staleness_frac/{j}"] = sum(x == j for x in lags) / len(lags)
    return out


# ---- (de)serialising finished batches into checkpoint state (plain values only) -------------------


# What training needs of a sample; texts, answers and dataset metadata stay out of checkpoints.
_SAMPLE_FIELDS = ("prompt_index", "group_id", "prompt_ids", "response_ids", "rollout_logprobs",
                  "weight_version", "finish_reason", "reward", "advantage", "loss_mask")


def batch_to_state(result: RolloutBatch) -> dict:
    return {"step": result.step, "sampler_start": result.sampler_start, "metrics": dict(result.metrics),
            "samples": [{k: getattr(s, k) for k in _SAMPLE_FIELDS} for s in result.samples]}


def batch_from_state(state: dict) -> RolloutBatch:
    return RolloutBatch(samples=[Sample(**s) for s in state["samples"]], metrics=dict(state["metrics"]),
                         step=int(state["step"]), sampler_start=dict(state["sampler_start"]))


class AsyncRolloutProducer:
    """Rank 0's background generator of rollout batches ``next_step, next_step + 1, ...``.

    ``collect(step)`` produces batch ``step`` (sampling its prompts from ``sampler``);
    ``last_step`` bounds production (the run's --num-rollouts).
    """

    def __init__(self, collect: Callable[[int], Any], sampler, *, max_staleness: int, weight_version: int,
                 next_step: int, last_step: int, pending: list[Any] = ()) -> None:
        if max_staleness < 0:
            raise ValueError(f"--max-staleness must be >= 0, got {max_staleness}")
        self._collect = collect
        self._sampler = sampler
        self.max_staleness = max_staleness
        self._version = weight_version
        self._ready: deque = deque(pending)
        self._next = next_step + len(self._ready)  # the next batch to produce
        self._last = last_step
        self._inflight_start: dict | None = None  # sampler state at the start of the batch in flight
        self._waiting_for: int | None = None  # the weight version the staleness bound waits for
        self._error: BaseException | None = None
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="async-rollout", daemon=True)
        self.wait_s = 0.0  # time the trainer spent waiting for batches (not overlapped)

    def start(self) -> AsyncRolloutProducer:
        self._thread.start()
        return self

    # ---- producer thread ----------------------------------------------------------------------

    def _may_produce(self) -> bool:
        return self._stop or (self._next <= self._last
                              and self._version >= self._next - 1 - self.max_staleness)

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if not self._may_produce() and self._next <= self._last:
                        self._waiting_for = self._next - 1 - self.max_staleness
                        self._cond.notify_all()
                    self._cond.wait_for(self._may_produce)
                    self._waiting_for = None
                    if self._stop:
                        return
                    step = self._next
                    self._inflight_start = self._sampler.state_dict()
                result = self._collect(step)
                result.step = step
                result.sampler_start = self._inflight_start
                with self._cond:
                    self._ready.append(result)
                    self._next += 1
                    self._inflight_start = None
                    self._cond.notify_all()
        except BaseException as e:  # re-raised in the trainer's get()
            with self._cond:
                if not self._stop:
                    self._error = e
                    log.error("asynchronous rollout failed: %s", e)
                self._cond.notify_all()

    # ---- trainer side (main thread) ------------------------------------------------------------

    def get(self, step: int) -> Any:
        """The finished batch ``step`` (waits for it; re-raises the producer's error)."""
        t0 = time.perf_counter()
        with self._cond:
            self._cond.wait_for(lambda: self._ready or self._error is not None or self._stop)
            if self._error is not None:
                raise self._error
            if not self._ready:
                raise ProducerStopped(f"rollout producer stopped before batch {step}")
            result = self._ready.popleft()
            self._cond.notify_all()
        self.wait_s = time.perf_counter() - t0
        if result.step != step:
            raise RuntimeError(f"asynchronous rollout handed batch {result.step} to step {step}")
        return result

    def weights_updated(self, version: int) -> None:
        """The servers now hold ``version`` (after a refit): batches it allows may start."""
        with self._cond:
            self._version = version
            self._cond.notify_all()

    def wait_until_blocked(self, timeout: float) -> int | None:
        """Wait until the producer sits at the staleness bound; returns the weight version it waits
        for (None if it did not block within ``timeout``). Lets callers observe the bound without
        guessing at timing."""
        with self._cond:
            self._cond.wait_for(lambda: self._waiting_for is not None or self._error is not None, timeout)
            return self._waiting_for

    def wait_until_produced(self, step: int, timeout: float | None = None) -> bool:
        """Wait until batch ``min(step, last_step)`` is finished (queued or already taken), or the
        producer failed or was closed; returns whether the batch is finished. The exact schedule
        calls it before every refit (see the module doc)."""
        with self._cond:
            target = min(step, self._last)
            return self._cond.wait_for(lambda: self._next > target or self._error is not None or self._stop,
                                       timeout) and self._next > target

    def queued(self) -> int:
        with self._cond:
            return len(self._ready)

    def state_dict(self) -> dict:
        """Finished-but-untrained batches and the sampler positions (see the module doc)."""
        with self._cond:
            pending = list(self._ready)
            resume_at = self._inflight_start if self._inflight_start is not None else self._sampler.state_dict()
        start = pending[0].sampler_start if pending else resume_at
        return {"version": _STATE_VERSION, "pending": [batch_to_state(r) for r in pending],
                "resume_sampler": resume_at, "start_sampler": start}

    def close(self) -> None:
        """Stop producing. A ``collect`` in flight finishes or fails on its own once the servers are
        shut down (then :meth:`join`); the daemon thread never blocks the process exit."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    def join(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)
