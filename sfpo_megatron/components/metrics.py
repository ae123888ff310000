"""Training metrics: `metrics.jsonl` (a line per iteration) and TensorBoard scalars.

Only the logging rank writes (by default global rank 0; pass `enabled=` for e.g. the last
pipeline stage's DP rank 0, where the loss lives). Everything is a no-op elsewhere, so callers
need no rank checks. Lines are flushed as they are written; a resumed run appends to the same
file (`read_metrics` keeps the last record per iteration) and TensorBoard drops events at or
after the resume step (`purge_step`).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import resource
import sys
import time
from typing import Any, Mapping, Optional

import psutil
import torch
from torch.utils.tensorboard import SummaryWriter

from sfpo_megatron.errors import UserError

METRICS_FILE = "metrics.jsonl"


class MetricsError(UserError):
    """A metric value that is not a real number, or an unreadable metrics.jsonl line."""


def _scalar(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise MetricsError(f"metric {name!r} is a tensor of shape {tuple(value.shape)}, not a scalar")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MetricsError(f"metric {name!r} = {value!r} is not a real number")
    return float(value)


def _drop_partial_last_line(path: str) -> None:
    """A crash mid-write can leave an unterminated line; cut it so appends start on a fresh line."""
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


class MetricsLogger:
    """Writes `{log_dir}/metrics.jsonl` and TensorBoard scalars under `tensorboard_dir`.

    Either directory may be None to skip that output. `start_iteration` (the iteration a resumed
    run continues from) makes TensorBoard discard the old run's events from that step on.
    """

    def __init__(self, log_dir: Optional[str], tensorboard_dir: Optional[str], rank: int,
                 enabled: Optional[bool] = None, start_iteration: Optional[int] = None) -> None:
        self.enabled = (rank == 0) if enabled is None else bool(enabled)
        self.rank = rank
        self.path: Optional[str] = None
        self._file = None
        self._writer = None
        if not self.enabled:
            return
        if log_dir is not None:
            os.makedirs(log_dir, exist_ok=True)
            self.path = os.path.join(log_dir, METRICS_FILE)
            if os.path.exists(self.path):
                _drop_partial_last_line(self.path)
            self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard_dir is not None:
            self._writer = SummaryWriter(log_dir=tensorboard_dir, purge_step=start_iteration)

    def log(self, iteration: int, scalars: Mapping[str, Any]) -> None:
        """Record one iteration's scalars (tensors with one element are read with .item())."""
        if not self.enabled:
            return
        values = {name: _scalar(name, value) for name, value in scalars.items()}
        if "iteration" in values:
            raise MetricsError("'iteration' is reserved for the iteration number")
        if self._file is not None:
            # NaN/inf are kept (a diverging loss is worth seeing); Python's json reads them back.
            self._file.write(json.dumps({"iteration": int(iteration), **values}) + "\n")
            self._file.flush()
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(name, value, global_step=int(iteration))
            self._writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str, last_per_iteration: bool = True) -> list[dict[str, float]]:
    """Records of a metrics.jsonl (a file or the directory holding it), in iteration order.

    With `last_per_iteration` a resumed run's re-logged iterations replace the earlier ones;
    otherwise every line is returned in file order.
    """
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MetricsError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
            if not isinstance(record, dict) or "iteration" not in record:
                raise MetricsError(f"{path}:{lineno}: expected an object with an 'iteration' field")
            records.append(record)
    if not last_per_iteration:
        return records
    by_iteration = {record["iteration"]: record for record in records}
    return [by_iteration[i] for i in sorted(by_iteration)]


def memory_stats(device: torch.device | str) -> dict[str, float]:
    """Memory of this process in GiB: the allocator's peak on CUDA; peak and current RSS on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return {
            "memory/max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "memory/max_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    rss = psutil.Process().memory_info().rss
    # ru_maxrss is KiB on Linux, bytes on macOS; the max() covers pages touched since it was sampled.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"memory/peak_rss_gib": max(peak, rss) / 2**30, "memory/rss_gib": rss / 2**30}


class ThroughputMeter:
    """Tokens per second between calls: `meter.start()` ... `meter.tokens_per_second(n_tokens)`.

    Time is host wall time; on GPU the caller synchronises first (the loss `.item()` usually does).
    """

    def __init__(self) -> None:
        self._start: Optional[float] = None

    def start(self) -> None:
        self._start = time.perf_counter()

    def tokens_per_second(self, tokens: int, restart: bool = True) -> float:
        if self._start is None:
            raise RuntimeError("ThroughputMeter.tokens_per_second() called before start()")
        now = time.perf_counter()
        elapsed = now - self._start
        if restart:
            self._start = now
        return tokens / elapsed if elapsed > 0 else math.inf
