"""Weight refit: every trainer rank gathers the policy into HF tensors, rank 0 pushes them.

Every rank runs ``conversion.hf_mapping.iter_hf_weights`` (TP shards all-gathered, PP stages sent
to the first stage, DP replicas other than the first return at once); rank 0 streams the
``(hf_name, full tensor)`` pairs into the transport, which packs them into
``--update-weight-buffer-size`` buckets and pushes them. The last bucket carries the new
``weight_version`` and the push checks every server reports it. Rank 0 then tells every rank
how it went, so a failed push raises on all of them instead of leaving the others in the next
collective. A push that lost servers mid-broadcast (``ServersDropped``: the dead ones are out of
rotation) is redone by every rank, gather included, towards the survivors; each retry has at
least one server fewer, and a refit with none left fails.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from sfpo_megatron.conversion.hf_mapping import copy_hf_side_files, iter_hf_weights
from sfpo_megatron.distributed.rank0 import rank
from sfpo_megatron.rollout.transport import DiskTransport, RefitError, ServersDropped

log = logging.getLogger(__name__)


@dataclass
class RefitStats:
    weight_version: int
    num_tensors: int
    num_buckets: int
    bytes: int
    seconds: float
    attempts: int = 1
    dropped: tuple[str, ...] = ()  # servers dropped during this refit
    live_servers: int = 0  # after it
    dropped_total: int = 0  # servers out of rotation so far (refits and /generate failover)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")

    def metrics(self) -> dict[str, float]:
        return {"refit/time_s": self.seconds, "refit/gb_per_s": self.gb_per_s,
                "refit/gb": self.bytes / 1e9, "refit/num_buckets": float(self.num_buckets),
                "refit/num_tensors": float(self.num_tensors), "refit/attempts": float(self.attempts),
                "refit/servers_dropped": float(len(self.dropped)),
                "rollout/live_servers": float(self.live_servers),
                "rollout/servers_dropped_total": float(self.dropped_total)}


def refit_weights(model_chunks: Sequence, hf_config: Any, transport, weight_version: int) -> RefitStats:
    """Collective: push this policy's weights as ``weight_version`` (``transport`` on rank 0 only)."""
    start = time.perf_counter()
    dropped: list[str] = []
    attempts = 0
    while True:
        attempts += 1
        status, value = _push_once(model_chunks, hf_config, transport, weight_version)
        if status == "ok":
            break
        if status == "retry":  # every rank gathers again, for a push to the surviving servers
            dropped += value
            log.warning("refit to weight_version %d lost %s; pushing again to the survivors", weight_version, value)
            continue
        raise RefitError(f"refit to weight_version {weight_version} failed on global rank 0: {value}")
    num_tensors, num_buckets, nbytes, pushed_dropped, live, total = value
    return RefitStats(weight_version, num_tensors, num_buckets, nbytes, time.perf_counter() - start, attempts,
                      tuple(dropped + pushed_dropped), live, total)


def _push_once(model_chunks: Sequence, hf_config: Any, transport, weight_version: int) -> tuple[str, Any]:
    """One gather + push; rank 0's outcome on every rank: ("ok", stats), ("retry", dropped urls)
    or ("error", message). Rank 0 re-raises its own error."""
    weights = iter_hf_weights(model_chunks, hf_config)
    box: list[Any] = [None]
    error: BaseException | None = None
    if rank() == 0:
        try:
            if transport is None:
                raise RefitError("refit_weights needs a transport on global rank 0")
            stats = transport.push(weights, str(weight_version))
            client = transport.client
            box[0] = ("ok", (stats.num_tensors, stats.num_buckets, stats.bytes, stats.dropped,
                             len(client.live_urls()), len(client.dropped)))
        except ServersDropped as e:
            box[0] = ("retry", e.dropped)
        except BaseException as e:  # noqa: BLE001 - the other ranks must finish the gather first
            error = e
            box[0] = ("error", f"{type(e).__name__}: {e}")
        if box[0][0] != "ok":
            try:  # finish the collective gather so the other ranks are not left waiting in it
                for _ in weights:
                    pass
            except BaseException:  # noqa: BLE001 - the first error is the one to report
                pass
    else:
        for _ in weights:  # the other ranks only take part in the gather
            pass
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    return box[0]


def export_hf(model_chunks: Sequence, hf_config: Any, directory: str | os.PathLike, weight_version: int,
              side_file_dirs: Sequence[str | os.PathLike] = ()) -> Path | None:
    """Collective: write the policy as a loadable HF directory (safetensors shards, config.json,
    tokenizer files found in ``side_file_dirs``). Returns its path on rank 0, None elsewhere."""
    weights = iter_hf_weights(model_chunks, hf_config)
    if rank() != 0:
        for _ in weights:
            pass
        return None
    # The disk transport's writer: sharded safetensors + index, renamed into place atomically.
    writer = DiskTransport(None, directory, config_dir=config_dir(hf_config))  # type: ignore[arg-type]
    path, _, _, _ = writer.write(weights, str(weight_version))
    for d in side_file_dirs:
        if os.path.isdir(d):
            copy_hf_side_files(str(d), str(path))
    return path


def config_dir(hf_config: Any) -> str | None:
    if isinstance(hf_config, (str, os.PathLike)):
        p = os.fspath(hf_config)
        return p if os.path.isdir(p) else os.path.dirname(p)
    return None
