"""Trainer-side weight refit: push full HF-named tensors to rollout servers.

The trainer (global rank 0 only) calls ``transport.push(named_tensors, version)`` with an iterator of
``(hf_name, full torch.Tensor)`` pairs; the megatron-shard gathering that produces them lives in
``rollout/refit.py``. Tensors are packed into buckets of ``bucket_bytes``
(``--update-weight-buffer-size``) and sent through one of SGLang's three update paths:

* ``disk``: each bucket becomes one safetensors shard of a new directory (written under a temporary
  name, then renamed, so a server never reads a half-written checkpoint); then every server gets
  ``POST /update_weights_from_disk`` with that directory. Servers must see the same filesystem.
* ``distributed``: the trainer and the servers form a torch.distributed group with SGLang's
  handshake (trainer = rank 0, server i = rank ``1 + i``); per bucket the trainer posts
  ``/update_weights_from_distributed`` (names, dtypes, shapes) to every server from background
  threads while broadcasting each tensor from rank 0.
* ``tensor``: colocated GPUs only (CUDA IPC handles); a clear error elsewhere.

Every push carries a ``weight_version`` string. It is attached to the last bucket only, so a server
reports the new version once the whole model has landed; ``push`` then checks every server reports it.

Failures. Every call to a server is bounded by ``timeout_s`` (``--refit-timeout``). A server that
cannot be reached, fails or does not answer in time is dropped (``RolloutClient.drop``: out of
rotation for good, so it never serves stale weights) and the refit goes on with the others:
``disk`` and ``tensor`` finish the push on the survivors; ``distributed`` tears its group down and
raises ``ServersDropped``, and the caller pushes again (a fresh tensor stream) to a group re-formed
with the survivors. A server answering ``success: false`` refused the weights (wrong names or
shapes): that is a ``RefitError``, as is a refit with no server left.
"""

from __future__ import annotations

import base64
import concurrent.futures
import importlib.util
import json
import logging
import os
import re
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from sfpo_megatron.distributed.platform import gpu_available, gpu_device
from sfpo_megatron.distributed.weight_update_group import (
    DEFAULT_GROUP_NAME,
    destroy_weight_update_group,
    dtype_name,
    init_weight_update_group,
)
from sfpo_megatron.errors import UserError
from sfpo_megatron.rollout.client import RolloutClient, RolloutServerError
from sfpo_megatron.rollout.sglang_launcher import find_free_port

logger = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 512 * 1024**2


class RefitError(UserError, RuntimeError):
    """A weight push failed; the message names the server and its answer."""


class TransportUnavailableError(RefitError):
    """The requested transport cannot run on this machine (e.g. CUDA IPC without a GPU)."""


class ServersDropped(RefitError):
    """Servers failed in the middle of a push that cannot go on without them (the broadcast group
    broke); they were dropped and the group torn down. Push again, with a fresh tensor stream, to
    refit the survivors."""

    def __init__(self, message: str, dropped: list[str]) -> None:
        super().__init__(message)
        self.dropped = dropped


DEFAULT_REFIT_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------------------------
# Buckets
# --------------------------------------------------------------------------------------------


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def iter_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group tensors in order into buckets of at most ``bucket_bytes``.

    A tensor larger than ``bucket_bytes`` travels alone (it cannot be split without changing names).
    Order is preserved, so a stream of tensors is never held in memory beyond one bucket.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in _checked(named_tensors):
        nbytes = tensor_bytes(tensor)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def _checked(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The pushed (name, tensor) pairs, refusing a non-tensor and a name pushed twice."""
    seen: set[str] = set()
    for name, tensor in named_tensors:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weight {name!r} is a {type(tensor).__name__}, expected a torch.Tensor")
        if name in seen:
            raise ValueError(f"weight {name!r} appears twice in one push")
        seen.add(name)
        yield name, tensor


def flatten_bucket(tensors: list[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """One uint8 tensor holding the tensors' bytes back to back, in order (SGLang's
    ``FlattenedTensorBucket`` layout: no padding, offsets implied by the dtypes and shapes)."""
    flat = torch.empty(sum(tensor_bytes(t) for t in tensors), dtype=torch.uint8,
                       device=device if device is not None else (tensors[0].device if tensors else "cpu"))
    offset = 0
    for t in tensors:
        n = tensor_bytes(t)
        flat[offset: offset + n].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
        offset += n
    return flat


# Tensors below this size share one flat buffer per bucket (one message instead of one per tensor);
# larger ones are a message each already, and flattening them would only add a copy on both ends.
FLAT_TENSOR_BYTES = 1 << 20
FLAT_BUCKET_BYTES = 32 << 20


def iter_mixed_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                       flat_bytes: int = FLAT_BUCKET_BYTES) -> Iterator[tuple[list[tuple[str, torch.Tensor]], bool]]:
    """(bucket, flattened) pairs: tensors of at least ``FLAT_TENSOR_BYTES`` in buckets of at most
    ``bucket_bytes`` sent tensor by tensor; smaller ones gathered aside into flat buckets of at most
    ``min(flat_bytes, bucket_bytes)``. Each stream stays in order."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    flat_cap = min(flat_bytes, bucket_bytes)
    big: list[tuple[str, torch.Tensor]] = []
    small: list[tuple[str, torch.Tensor]] = []
    big_size = small_size = 0
    for name, tensor in _checked(named_tensors):
        nbytes = tensor_bytes(tensor)
        if nbytes < FLAT_TENSOR_BYTES:
            if small and small_size + nbytes > flat_cap:
                yield small, True
                small, small_size = [], 0
            small.append((name, tensor))
            small_size += nbytes
        else:
            if big and big_size + nbytes > bucket_bytes:
                yield big, False
                big, big_size = [], 0
            big.append((name, tensor))
            big_size += nbytes
    if big:
        yield big, False
    if small:
        yield small, True


def _with_last_flag(buckets: Iterator[list]) -> Iterator[tuple[list, bool]]:
    """Yield (bucket, is_last) with one bucket of look-ahead."""
    current = next(buckets, None)
    while current is not None:
        following = next(buckets, None)
        yield current, following is None
        current = following


@dataclass
class PushStats:
    transport: str
    weight_version: str
    num_tensors: int
    num_buckets: int
    bytes: int
    seconds: float
    detail: dict[str, float] = field(default_factory=dict)  # per-phase seconds, transport specific
    dropped: list[str] = field(default_factory=list)  # servers dropped during this push

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")


# --------------------------------------------------------------------------------------------
# Transports
# --------------------------------------------------------------------------------------------


class WeightTransport(ABC):
    """Pushes full HF-named tensors to every live server of ``client``. Call on global rank 0 only."""

    name: str = ""

    def __init__(self, client: RolloutClient, bucket_bytes: int = DEFAULT_BUCKET_BYTES, verify: bool = True,
                 timeout_s: float = DEFAULT_REFIT_TIMEOUT_S):
        if bucket_bytes <= 0:
            raise ValueError(f"--update-weight-buffer-size must be positive, got {bucket_bytes}")
        if not timeout_s > 0:
            raise ValueError(f"--refit-timeout must be positive, got {timeout_s}")
        self.client = client
        self.bucket_bytes = int(bucket_bytes)
        self.verify = verify
        self.timeout_s = float(timeout_s)
        self._dropped: list[str] = []
        self._version: str | None = None  # of the push under way

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str) -> PushStats:
        if not isinstance(weight_version, str) or not weight_version:
            raise ValueError(f"weight_version must be a non-empty string, got {weight_version!r}")
        start = time.perf_counter()
        self._detail: dict[str, float] = {}
        self._dropped = []
        self._version = weight_version
        logger.info("refit via %s: pushing version %s to %d server(s)", self.name, weight_version,
                    len(self.client.live_urls()))
        num_tensors, num_buckets, nbytes = self._push(named_tensors, weight_version)
        if num_tensors == 0:
            raise ValueError("push got no tensors")
        if self.verify:
            self._verify_version(weight_version)
        stats = PushStats(self.name, weight_version, num_tensors, num_buckets, nbytes, time.perf_counter() - start,
                          dict(self._detail), list(self._dropped))
        logger.info(
            "refit via %s: version %s, %d tensors in %d buckets, %.3f GB in %.2fs (%.2f GB/s)",
            self.name, weight_version, num_tensors, num_buckets, nbytes / 1e9, stats.seconds, stats.gb_per_s,
        )
        return stats

    @abstractmethod
    def _push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str) -> tuple[int, int, int]:
        """Send everything; return (num_tensors, num_buckets, bytes)."""

    def close(self) -> None:
        """Release transport resources (process groups, temp dirs)."""

    def __enter__(self) -> WeightTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _verify_version(self, weight_version: str) -> None:
        reported = self._survivors(self.client.get_weight_version(timeout=self.timeout_s, per_server=True),
                                   "/get_weight_version")
        wrong = {url: v for url, v in reported.items() if v != weight_version}
        if wrong:
            raise RefitError(f"after pushing weight_version {weight_version!r} these servers report {wrong}")

    def _drop(self, url: str, why: str) -> None:
        """Take a server that failed the refit out of rotation; a clear error when none is left."""
        what = f"refit to weight_version {self._version}" if self._version else "weight refit"
        self.client.drop(url, f"{what} failed: {why}")
        self._dropped.append(url)
        if not self.client.live_urls():
            raise RefitError(f"no live rollout server left for the {what}: "
                             + "; ".join(f"{u} ({w})" for u, w in self.client.dropped))

    def _survivors(self, answers: dict[str, Any], what: str) -> dict[str, Any]:
        """Drop the servers whose ``call_each`` answer is an error; the others' answers."""
        for url, answer in answers.items():
            if isinstance(answer, Exception):
                self._drop(url, f"{what}: {answer}")
        return {u: a for u, a in answers.items() if not isinstance(a, Exception)}

    @staticmethod
    def _check_results(results: dict[str, dict], what: str) -> None:
        failed = {url: r for url, r in results.items() if not r.get("success", False)}
        if failed:
            raise RefitError(f"{what} failed on {len(failed)} server(s): {failed}")


class DiskTransport(WeightTransport):
    """Safetensors shards in a fresh directory per version, then /update_weights_from_disk everywhere."""

    name = "disk"

    def __init__(
        self,
        client: RolloutClient,
        directory: str | os.PathLike,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        keep_last: int = 1,
        config_dir: str | os.PathLike | None = None,
        verify: bool = True,
        timeout_s: float = DEFAULT_REFIT_TIMEOUT_S,
    ):
        super().__init__(client, bucket_bytes, verify, timeout_s)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        self.keep_last = keep_last
        # SGLang reloads weights only, but copying config.json makes each version dir a loadable HF dir.
        self.config_dir = Path(config_dir) if config_dir is not None else None
        self._written: list[Path] = []

    def version_dir(self, weight_version: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", weight_version)
        return self.directory / f"weights_{safe}"

    def write(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str) -> tuple[Path, int, int, int]:
        """Write one HF-style sharded safetensors dir atomically; return (dir, tensors, shards, bytes)."""
        tmp = self.start_version()
        try:
            part = self.write_part(named_tensors, tmp, "part0")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.finish_version(tmp, [part], weight_version)

    def start_version(self) -> Path:
        """A fresh temporary directory that ``write_part`` calls fill and ``finish_version`` names."""
        tmp = self.directory / f".tmp_{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        return tmp

    def write_part(self, named_tensors: Iterable[tuple[str, torch.Tensor]], tmp: str | os.PathLike,
                   part: str) -> list[tuple[str, list[str], int]]:
        """Write a stream of tensors as shard files ``{part}-NNNNN.safetensors`` in ``tmp`` (several
        writers, one ``part`` each, may fill one directory at once); returns (file, names, bytes)
        of each shard, for ``finish_version``."""
        shards = []
        for i, bucket in enumerate(iter_buckets(named_tensors, self.bucket_bytes)):
            tensors = {n: t.detach().contiguous().cpu() for n, t in bucket}
            fname = f"{part}-{i:05d}.safetensors"
            save_file(tensors, str(Path(tmp) / fname), metadata={"format": "pt"})
            shards.append((fname, [n for n, _ in bucket], sum(tensor_bytes(t) for t in tensors.values())))
        return shards

    def finish_version(self, tmp: str | os.PathLike, parts: list[list[tuple[str, list[str], int]]],
                       weight_version: str) -> tuple[Path, int, int, int]:
        """Give the shards of every part HF's names (``model-00001-of-0000N``) in part order, write
        one ``model.safetensors.index.json`` and rename the directory into place atomically."""
        tmp = Path(tmp)
        final = self.version_dir(weight_version)
        try:
            shards = [shard for part in parts for shard in part]
            total, nbytes, weight_map = len(shards), 0, {}
            for i, (name, names, size) in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
                os.rename(tmp / name, tmp / fname)
                for n in names:
                    if n in weight_map:
                        raise RefitError(f"tensor {n} was written twice ({weight_map[n]} and {fname})")
                    weight_map[n] = fname
                nbytes += size
            index = {"metadata": {"total_size": nbytes, "weight_version": weight_version}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
            if self.config_dir is not None:
                for cfg in ("config.json", "generation_config.json"):
                    if (self.config_dir / cfg).exists():
                        shutil.copy2(self.config_dir / cfg, tmp / cfg)
            if final.exists():  # same version pushed again: replace it
                trash = self.directory / f".old_{final.name}_{uuid.uuid4().hex[:8]}"
                os.rename(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final, len(weight_map), total, nbytes

    def load(self, path: Path, weight_version: str) -> None:
        """``/update_weights_from_disk`` of a finished version on every live server (failures dropped)."""
        self._version = weight_version
        results = self._survivors(self.client.update_weights_from_disk(
            str(path), weight_version=weight_version, timeout=self.timeout_s, per_server=True),
            "/update_weights_from_disk")
        self._check_results(results, f"/update_weights_from_disk of {path}")
        if path in self._written:
            self._written.remove(path)
        self._written.append(path)
        while len(self._written) > self.keep_last:
            shutil.rmtree(self._written.pop(0), ignore_errors=True)
        if self.verify:
            self._verify_version(weight_version)

    def _push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str) -> tuple[int, int, int]:
        t0 = time.perf_counter()
        path, num_tensors, num_buckets, nbytes = self.write(named_tensors, weight_version)
        t1 = time.perf_counter()
        verify, self.verify = self.verify, False  # push() verifies once, after this
        try:
            self.load(path, weight_version)
        finally:
            self.verify = verify
        self._detail.update(write_s=t1 - t0, server_load_s=time.perf_counter() - t1)
        return num_tensors, num_buckets, nbytes


class DistributedTransport(WeightTransport):
    """torch.distributed broadcast from the trainer (rank 0) to every server (ranks 1..N).

    The group holds the servers that were live when it formed. When that set changes (a server
    dropped by ``/generate`` failover or by a failed refit) the group is torn down and re-formed
    with the live servers, under a new group name, before the next push.
    """

    name = "distributed"

    def __init__(
        self,
        client: RolloutClient,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        master_address: str = "127.0.0.1",
        master_port: int | None = None,
        backend: str | None = None,
        group_name: str = DEFAULT_GROUP_NAME,
        timeout_s: float = DEFAULT_REFIT_TIMEOUT_S,
        verify: bool = True,
        staged: bool = True,
    ):
        super().__init__(client, bucket_bytes, verify, timeout_s)
        # staged=False: the per-tensor protocol with the version on the last bucket (SGLang's
        # plain use; kept to measure against).
        self.staged = staged
        self.master_address = master_address
        self.master_port = master_port
        self.backend = backend or ("nccl" if gpu_available() else "gloo")
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {self.backend!r}")
        self.base_group_name = group_name
        self.group_name = group_name
        self._formed = 0  # groups formed so far: a re-formed group gets a fresh name
        self._pg: dist.ProcessGroup | None = None
        self._urls: list[str] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="refit-http")

    @property
    def device(self) -> torch.device:
        return gpu_device() if self.backend == "nccl" else torch.device("cpu")

    @property
    def _probe_s(self) -> float:
        return min(5.0, self.timeout_s / 4)

    def connect(self) -> None:
        """Form the group: servers join from their /init_weights_update_group handlers while we join here."""
        if self._pg is not None:
            return
        # A server that died since it last served is dropped here, not after a rendezvous timeout.
        self._survivors(self.client.call_each("/health", method="GET", timeout=self._probe_s),
                        "GET /health before forming the weight-update group")
        self._urls = self.client.live_urls()
        if not self._urls:
            raise RefitError("no live rollout server to connect the weight-update group to")
        # A fresh name per group: a survivor may still hold the last one (its destroy is best effort).
        self.group_name = self.base_group_name if not self._formed else f"{self.base_group_name}_{self._formed}"
        port = self.master_port or find_free_port(self.master_address)
        world_size = 1 + len(self._urls)
        futures = {
            url: self._pool.submit(
                self.client.init_weights_update_group,
                master_address=self.master_address,
                master_port=port,
                rank_offset=1 + i,
                world_size=world_size,
                group_name=self.group_name,
                backend=self.backend,
                url=url,
                timeout=self.timeout_s,
            )
            for i, url in enumerate(self._urls)
        }
        try:
            self._pg = init_weight_update_group(
                self.master_address, port, 0, world_size, self.group_name, self.backend, self.timeout_s
            )
        except Exception as e:
            failures = {u: repr(f.exception()) for u, f in futures.items() if f.done() and f.exception()}
            raise RefitError(f"could not form the weight-update group on port {port}: {e}; server errors: {failures}") from e
        self._formed += 1
        results = {}
        for url, f in futures.items():
            try:
                results[url] = f.result(timeout=self.timeout_s)
            except Exception as e:  # noqa: BLE001 - reported below with the server's name
                results[url] = {"success": False, "message": repr(e)}
        self._check_results(results, "/init_weights_update_group")
        logger.info("weight-update group %r formed with %d server(s) on port %d", self.group_name, len(self._urls), port)

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str) -> PushStats:
        if not self.staged:
            return super().push(named_tensors, weight_version)
        logger.info("refit via %s: pushing version %s to %d server(s)", self.name, weight_version,
                    len(self.client.live_urls()))
        stats = self.push_part(named_tensors, weight_version)
        if stats.num_tensors == 0:
            raise ValueError("push got no tensors")
        t0 = time.perf_counter()
        self.commit(weight_version)
        stats.seconds += time.perf_counter() - t0
        return stats

    def push_part(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str) -> PushStats:
        """Send a stream of tensors that the servers stage, without ending the update: one part
        of a refit that several trainer processes push at once, each through its own group.
        ``commit`` (once every part is in) applies them all and sets ``weight_version``."""
        start = time.perf_counter()
        self._detail, self._dropped, self._version = {}, [], weight_version
        num_tensors, num_buckets, nbytes = self._push(named_tensors, weight_version)
        return PushStats(self.name, weight_version, num_tensors, num_buckets, nbytes, time.perf_counter() - start,
                         dict(self._detail), list(self._dropped))

    def commit(self, weight_version: str) -> None:
        """End the update on every live server: ``/update_weight_version`` (the CPU server applies
        the staged tensors with it; SGLang has written them already), then ``/flush_cache``, then
        check every server reports the version. A server that fails it is dropped."""
        self._version = weight_version
        answers = self._survivors(self.client.call_each(
            "/update_weight_version", {"new_version": weight_version, "abort_all_requests": False},
            timeout=self.timeout_s), "/update_weight_version")
        self._check_results(answers, "/update_weight_version")
        # The prefix cache holds KV of the old weights. SGLang refuses to flush while requests run
        # (they finish on their own cache): a warning, not a failure.
        for url, answer in self.client.call_each("/flush_cache", timeout=self.timeout_s).items():
            if isinstance(answer, Exception) or not answer.get("success", True):
                logger.warning("/flush_cache on %s after weight_version %s: %s", url, weight_version, answer)
        if self.verify:
            self._verify_version(weight_version)

    def _push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str) -> tuple[int, int, int]:
        if self._pg is not None and self.client.live_urls() != self._urls:
            logger.warning("live servers changed since the weight-update group formed (%s -> %s): re-forming it",
                           self._urls, self.client.live_urls())
            self._teardown()
        self.connect()
        num_tensors = num_buckets = nbytes = 0
        if self.staged:
            # Two buckets exist at once (the one on the wire, the next one being gathered): each
            # gets half of --update-weight-buffer-size.
            pairs: Iterator[tuple[list, bool]] = iter_mixed_buckets(named_tensors, max(1, self.bucket_bytes // 2))
        else:
            pairs = _with_last_flag(iter_buckets(named_tensors, self.bucket_bytes))
        current = next(pairs, None)
        while current is not None:
            bucket, flag = current  # staged: flattened or not; else: the last bucket or not
            last = flag and not self.staged
            inflight = self._start_bucket(bucket, weight_version if last else None, last,
                                          flattened=flag and self.staged)
            size, count = sum(tensor_bytes(t) for _, t in bucket), len(bucket)
            del bucket, current  # staged: on the wire as one flat copy
            current = next(pairs, None) if self.staged else None  # gathered while the bucket travels
            failed = self._finish_bucket(*inflight)
            if failed:
                for url, why in failed.items():
                    self._drop(url, why)  # raises RefitError when nobody is left
                self._teardown()
                raise ServersDropped(
                    f"refit to weight_version {weight_version}: dropped {sorted(failed)} mid-broadcast; "
                    f"{len(self.client.live_urls())} server(s) left", sorted(failed))
            num_tensors += count
            num_buckets += 1
            nbytes += size
            del inflight
            if not self.staged:
                current = next(pairs, None)
        return num_tensors, num_buckets, nbytes

    def _start_bucket(self, bucket: list[tuple[str, torch.Tensor]], weight_version: str | None,
                      last: bool, flattened: bool = False) -> tuple[dict, dict, list]:
        """Announce one bucket to every server and start broadcasting it."""
        tensors = [t.detach() for _, t in bucket]
        payload: dict[str, Any] = {
            "names": [n for n, _ in bucket],
            "dtypes": [dtype_name(t.dtype) for t in tensors],
            "shapes": [list(t.shape) for t in tensors],
            "group_name": self.group_name,
            "flush_cache": last,
        }
        if flattened:
            # One message for the bucket: the tensors' bytes back to back (SGLang's flattened
            # bucket); names, dtypes and shapes are the manifest, offsets follow from them.
            payload["load_format"] = "flattened_bucket"
            sends = [flatten_bucket(tensors, self.device)]
        else:
            sends = [t.to(self.device).contiguous() for t in tensors]
        if weight_version is not None:
            payload["weight_version"] = weight_version
        posts = {
            url: self._pool.submit(self.client.update_weights_from_distributed, url=url, timeout=self.timeout_s,
                                   **payload)
            for url in self._urls
        }
        works = [dist.broadcast(t, src=0, group=self._pg, async_op=True) for t in sends]
        return payload, posts, works

    def _finish_bucket(self, payload: dict, posts: dict, works: list) -> dict[str, str]:
        """Wait for a started bucket; {url: why} of the servers that failed it."""
        # Poll rather than wait(): a server that died or refused the request never receives, and
        # waiting on the collective would then hang until the group's timeout instead of reporting it.
        # The last part of the timeout is kept for telling a hung server from a waiting one.
        deadline = time.monotonic() + self.timeout_s - self._probe_s
        while True:
            # A server that cannot be reached (it died) is the culprit, whatever the broadcast did:
            # the others may wait for data that the broken broadcast never sends them.
            unreachable = {url: f"/update_weights_from_distributed: {f.exception()}" for url, f in posts.items()
                           if f.done() and isinstance(f.exception(), RolloutServerError)}
            if unreachable:
                return unreachable
            for url, f in posts.items():
                if f.done() and f.exception() is None and not f.result().get("success", False):
                    raise RefitError(f"{url} refused /update_weights_from_distributed mid-broadcast: {f.result()}")
            if all(w.is_completed() for w in works) and all(f.done() for f in posts.values()):
                break
            if time.monotonic() > deadline:
                return self._culprits([url for url, f in posts.items() if not f.done()], payload["names"])
            time.sleep(0.001)
        for w in works:
            w.wait()
        results = {url: f.result() for url, f in posts.items()}
        self._check_results(results, "/update_weights_from_distributed")
        return {}

    def _culprits(self, silent: list[str], names: list[str]) -> dict[str, str]:
        """The broadcast missed its deadline. A server stuck in it still answers ``/health`` (only
        its engine waits for data, which a stalled peer can hold up); one that does not is hung."""
        probe = self.client.call_each("/health", method="GET", urls=silent, timeout=self._probe_s)
        hung = {url: f"no answer to /update_weights_from_distributed nor /health within --refit-timeout "
                     f"{self.timeout_s:g}s" for url, answer in probe.items() if isinstance(answer, Exception)}
        if not hung:
            raise RefitError(f"broadcast of {names[:3]}... did not complete within --refit-timeout "
                             f"{self.timeout_s:g}s, and every server still answers /health "
                             f"(waiting: {silent or 'none'})")
        return hung

    def leave(self) -> None:
        """Drop the group (here and, in the background, on its servers, which drop what it staged)."""
        self._teardown()

    def _teardown(self, wait: bool = False) -> None:
        """Drop the group here and on its servers that are still live. Their destroy may wait
        for a broadcast they are still stuck in (until their own group timeout), so it runs in
        the background unless ``wait``: the next group has a new name and does not need it."""
        if self._pg is None:
            return
        pg, name, urls, self._pg, self._urls = self._pg, self.group_name, self._urls, None, []
        live = [u for u in urls if u in self.client.live_urls()]
        if live:
            done = self._pool.submit(self._destroy_on_servers, name, live)
            if wait:
                done.result()
        destroy_weight_update_group(pg)

    def _destroy_on_servers(self, name: str, urls: list[str]) -> None:
        answers = self.client.destroy_weights_update_group(name, urls=urls, timeout=self.timeout_s, per_server=True)
        failed = {u: a for u, a in answers.items() if isinstance(a, Exception) or not a.get("success", False)}
        if failed:
            logger.warning("could not destroy weight-update group %r on %s", name, failed)

    def close(self) -> None:
        try:
            self._teardown(wait=True)
        except Exception as e:  # noqa: BLE001 - servers may already be gone; the local group must still go
            logger.warning("could not tear down the weight-update group: %s", e)
        self._pool.shutdown(wait=False)


class TensorTransport(WeightTransport):
    """SGLang's /update_weights_from_tensor: CUDA IPC handles between colocated GPU processes.

    GPU-only. The payload is SGLang's own serialisation (``MultiprocessingSerializer``: pickled CUDA
    IPC handles, base64 in JSON), so this path needs ``sglang`` importable in the trainer process.
    """

    name = "tensor"

    def __init__(self, client: RolloutClient, bucket_bytes: int = DEFAULT_BUCKET_BYTES, tp_size: int = 1, verify: bool = True,
                 timeout_s: float = DEFAULT_REFIT_TIMEOUT_S):
        if not gpu_available():
            raise TransportUnavailableError(
                "the 'tensor' refit transport sends CUDA IPC handles to servers on the same GPUs "
                "(--colocate); torch.cuda.is_available() is False here. Use --weight-transport disk or distributed."
            )
        if importlib.util.find_spec("sglang") is None:
            raise TransportUnavailableError(
                "the 'tensor' refit transport serialises with sglang's MultiprocessingSerializer, "
                "and sglang is not importable in this Python; install sglang or use disk/distributed"
            )
        super().__init__(client, bucket_bytes, verify, timeout_s)
        self.tp_size = tp_size

    def _push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str) -> tuple[int, int, int]:
        from sglang.srt.utils import MultiprocessingSerializer  # GPU nodes only

        device = gpu_device()
        num_tensors = num_buckets = nbytes = 0
        for bucket, last in _with_last_flag(iter_buckets(named_tensors, self.bucket_bytes)):
            on_gpu = [(n, t.detach().to(device).contiguous()) for n, t in bucket]
            blob = MultiprocessingSerializer.serialize(on_gpu, output_str=True)
            if isinstance(blob, bytes):
                blob = base64.b64encode(blob).decode()
            payload: dict[str, Any] = {"serialized_named_tensors": [blob] * self.tp_size, "flush_cache": last}
            if last:
                payload["weight_version"] = weight_version
            # A server that fails a bucket is dropped; the survivors get every bucket.
            results = self._survivors(self.client.update_weights_from_tensor(
                **payload, timeout=self.timeout_s, per_server=True), "/update_weights_from_tensor")
            self._check_results(results, "/update_weights_from_tensor")
            num_tensors += len(bucket)
            num_buckets += 1
            nbytes += sum(tensor_bytes(t) for _, t in on_gpu)
        return num_tensors, num_buckets, nbytes


TRANSPORTS = {"disk": DiskTransport, "distributed": DistributedTransport, "tensor": TensorTransport}


def make_transport(kind: str, client: RolloutClient, **kwargs: Any) -> WeightTransport:
    """Build the transport named by ``--weight-transport`` (disk | distributed | tensor)."""
    if kind not in TRANSPORTS:
        raise ValueError(f"unknown refit transport {kind!r}; choose one of {sorted(TRANSPORTS)}")
    return TRANSPORTS[kind](client, **kwargs)
