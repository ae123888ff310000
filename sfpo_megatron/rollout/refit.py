"""Keeping the rollout servers on the trainer's weights: start them, refit them, share devices.

``RolloutEngines`` is built on every trainer rank; only global rank 0 speaks HTTP. Its calls that
touch the model (``start``, ``refit``) are collectives every trainer rank makes:

* **refit** (:func:`refit_weights`): every rank runs ``conversion.hf_mapping.iter_hf_weights``
  (TP shards all-gathered, PP stages sent to the first stage, DP replicas other than the first
  return at once); rank 0 streams the ``(hf_name, full tensor)`` pairs into the transport, which
  packs them into ``--update-weight-buffer-size`` buckets and pushes them (``distributed``: a gloo
  or NCCL broadcast group with SGLang's handshake; ``disk``: safetensors + ``/update_weights_from_disk``;
  ``tensor``: CUDA IPC, colocated GPUs only). The last bucket carries the new ``weight_version``,
  and the push checks every server reports it. Rank 0 then tells every rank how it went, so a
  failed push raises on all of them instead of leaving the others in the next collective.
* **start**: for ``--rollout-backend cpu|sglang`` the current policy is exported as an HF
  directory (the same gather, written by the disk transport's writer, plus config and tokenizer
  files) and the launcher starts ``--rollout-num-servers`` engines from it at the current weight
  version; ``external`` connects to ``--rollout-urls`` and refits them once.
* **colocated** (``--colocate``): servers share the trainer's devices. After rollout the servers
  release their memory (``/release_memory_occupation``: weights and KV cache), the trainer trains,
  then ``/resume_memory_occupation`` brings the weights back just before the refit writes into
  them, and the KV cache after it. SGLang engines are placed on the trainer's GPUs
  (``--base-gpu-id 0``). **Disaggregated** (the default): servers keep their memory and get
  their own devices (SGLang's ``--base-gpu-id`` starts after the node's trainer GPUs).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import torch.distributed as dist

from sfpo_megatron.rollout.sglang_launcher import LaunchConfig, RolloutLauncher
from sfpo_megatron.rollout.transport import RefitError

log = logging.getLogger(__name__)

T = TypeVar("T")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class RolloutConfigError(ValueError):
    """Rollout flags that cannot work together, named with their values."""


class RankZeroError(RuntimeError):
    """Raised on the other trainer ranks when work that only global rank 0 does failed there."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def on_rank0(fn: Callable[[], T]) -> T:
    """Run ``fn`` on global rank 0 and give its result to every trainer rank (collective).

    The result travels with ``broadcast_object_list`` (pickle between trainer ranks only, never
    socket data). If ``fn`` raises, rank 0 re-raises it and the other ranks raise
    ``RankZeroError`` naming it, so no rank waits forever in the next collective.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    box: list[Any] = [None]
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the others are told
            error = e
            box[0] = ("error", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status != "ok":
        raise RankZeroError(f"global rank 0 failed: {value}")
    return value


@dataclass
class RefitStats:
    weight_version: int
    num_tensors: int
    num_buckets: int
    bytes: int
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")

    def metrics(self) -> dict[str, float]:
        return {"refit/time_s": self.seconds, "refit/gb_per_s": self.gb_per_s,
                "refit/gb": self.bytes / 1e9, "refit/num_buckets": float(self.num_buckets),
                "refit/num_tensors": float(self.num_tensors)}


def refit_weights(model_chunks: Sequence, hf_config: Any, transport, weight_version: int) -> RefitStats:
    """Collective: push this policy's weights as ``weight_version`` (``transport`` on rank 0 only)."""
    from sfpo_megatron.conversion.hf_mapping import iter_hf_weights

    start = time.perf_counter()
    weights = iter_hf_weights(model_chunks, hf_config)
    box: list[Any] = [None]
    error: BaseException | None = None
    if _rank() == 0:
        try:
            if transport is None:
                raise RefitError("refit_weights needs a transport on global rank 0")
            stats = transport.push(weights, str(weight_version))
            box[0] = ("ok", (stats.num_tensors, stats.num_buckets, stats.bytes))
        except BaseException as e:  # noqa: BLE001 - the other ranks must finish the gather first
            error = e
            box[0] = ("error", f"{type(e).__name__}: {e}")
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
    status, value = box[0]
    if status != "ok":
        raise RefitError(f"refit to weight_version {weight_version} failed on global rank 0: {value}")
    num_tensors, num_buckets, nbytes = value
    return RefitStats(weight_version, num_tensors, num_buckets, nbytes, time.perf_counter() - start)


def export_hf(model_chunks: Sequence, hf_config: Any, directory: str | os.PathLike, weight_version: int,
              side_file_dirs: Sequence[str | os.PathLike] = ()) -> Path | None:
    """Collective: write the policy as a loadable HF directory (safetensors shards, config.json,
    tokenizer files found in ``side_file_dirs``). Returns its path on rank 0, None elsewhere."""
    from sfpo_megatron.conversion.hf_mapping import copy_hf_side_files, iter_hf_weights
    from sfpo_megatron.rollout.transport import DiskTransport

    weights = iter_hf_weights(model_chunks, hf_config)
    if _rank() != 0:
        for _ in weights:
            pass
        return None
    # The disk transport's writer: sharded safetensors + index, renamed into place atomically.
    writer = DiskTransport(None, directory, config_dir=_config_dir(hf_config))  # type: ignore[arg-type]
    path, _, _, _ = writer.write(weights, str(weight_version))
    for d in side_file_dirs:
        if os.path.isdir(d):
            copy_hf_side_files(str(d), str(path))
    return path


def _config_dir(hf_config: Any) -> str | None:
    if isinstance(hf_config, (str, os.PathLike)):
        p = os.fspath(hf_config)
        return p if os.path.isdir(p) else os.path.dirname(p)
    return None


def trainer_address(urls: Sequence[str]) -> str:
    """The address rollout servers reach the trainer's rank 0 at (for the broadcast group)."""
    hosts = {urlparse(u if "://" in u else f"http://{u}").hostname for u in urls}
    if hosts <= set(LOCAL_HOSTS):
        return "127.0.0.1"
    # Remote servers: rank 0's node, as torchrun / srun scripts name it, else this host's address.
    addr = os.environ.get("MASTER_ADDR")
    if addr and addr not in LOCAL_HOSTS:
        return addr
    return socket.gethostbyname(socket.getfqdn())


class RolloutEngines:
    """The rollout servers of one run: launched or external, their client and weight transport.

    Build it on every trainer rank with the same arguments; ``client`` exists on global rank 0.
    """

    def __init__(self, args: argparse.Namespace, hf_config: str, workdir: str | os.PathLike,
                 side_file_dirs: Sequence[str] = (), sglang_args: Sequence[str] = ()) -> None:
        self.args = args
        self.hf_config = hf_config
        self.workdir = Path(workdir)
        self.side_file_dirs = list(side_file_dirs)
        self.sglang_args = list(sglang_args)
        self.launcher = None
        self.client = None
        self.transport = None
        self._released = False
        check_rollout_args(args)

    # ---- start / stop --------------------------------------------------------------------------

    def start(self, model_chunks: Sequence, weight_version: int) -> list[str]:
        """Collective: servers up and serving this policy at ``weight_version``; returns their urls."""
        if self.args.rollout_backend == "external":
            urls = on_rank0(lambda: self._connect(list(self.args.rollout_urls)))
            self.refit(model_chunks, weight_version)
            return urls
        model_dir = export_hf(model_chunks, self.hf_config, self.workdir / "hf_init", weight_version,
                              self.side_file_dirs)
        return on_rank0(lambda: self._launch(str(model_dir), weight_version))

    def _launch(self, model_path: str, weight_version: int) -> list[str]:
        a = self.args
        extra: list[str] = []
        if a.rollout_backend == "sglang":
            extra += self.sglang_args
            if a.rollout_deterministic:
                extra.append("--enable-deterministic-inference")
        elif a.rollout_deterministic:
            # One sequence per forward: no padding or batch-shape dependent rounding, so a sample
            # depends only on (weights, prompt, seed) and a resumed run regenerates it bit for bit.
            extra += ["--max-batch-size", "1"]
        # Disaggregated SGLang engines start after this node's trainer GPUs; colocated share them.
        trainer_gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        cfg = LaunchConfig(
            model_path=model_path, backend=a.rollout_backend, num_engines=a.rollout_num_servers,
            tp_size=a.rollout_tp_size, host=a.rollout_host, base_port=a.rollout_port_base,
            mem_fraction_static=a.rollout_mem_fraction if a.rollout_backend == "sglang" else None,
            extra_args=extra, log_dir=str(self.workdir / "logs"),
            weight_version=str(weight_version),
            gpu_offset=0 if a.colocate else trainer_gpus)
        self.launcher = RolloutLauncher(cfg)
        urls = self.launcher.start()
        self._connect(urls)
        return urls

    def _connect(self, urls: list[str]) -> list[str]:
        from sfpo_megatron.rollout.client import RolloutClient
        from sfpo_megatron.rollout.transport import make_transport

        a = self.args
        self.client = RolloutClient(urls, max_concurrency=a.rollout_max_concurrency,
                                    timeout=a.rollout_timeout, retries=a.rollout_retries)
        dead = [u for u, ok in self.client.health().items() if not ok]
        if dead:
            raise RefitError(f"rollout servers not healthy: {dead}")
        kwargs: dict[str, Any] = {"bucket_bytes": a.update_weight_buffer_size}
        if a.weight_transport == "disk":
            kwargs.update(directory=str(self.workdir / "refit"), config_dir=_config_dir(self.hf_config))
        elif a.weight_transport == "distributed":
            kwargs.update(master_address=trainer_address(urls), timeout_s=a.rollout_timeout)
        elif a.weight_transport == "tensor":
            kwargs.update(tp_size=a.rollout_tp_size)
        self.transport = make_transport(a.weight_transport, self.client, **kwargs)
        if a.weight_transport == "distributed":
            self.transport.connect()
        log.info("rollout servers %s, weight transport %s", urls, a.weight_transport)
        return list(urls)

    def close(self) -> None:
        """Rank 0: drop the weight-update group and stop launched servers (idempotent)."""
        if self.transport is not None:
            try:
                self.transport.close()
            except Exception as e:  # noqa: BLE001 - shutting down; the servers may be gone
                log.warning("closing the weight transport: %s", e)
            self.transport = None
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.launcher is not None:
            self.launcher.stop()
            self.launcher = None

    # ---- weights -------------------------------------------------------------------------------

    def refit(self, model_chunks: Sequence, weight_version: int) -> RefitStats:
        """Collective: push the policy as ``weight_version`` (resuming released server memory)."""
        if self._released:
            on_rank0(lambda: self._resume(["weights"]))
        stats = refit_weights(model_chunks, self.hf_config, self.transport, weight_version)
        if self._released:
            on_rank0(lambda: self._resume(["kv_cache"]))
            self._released = False
        return stats

    # ---- colocated memory ----------------------------------------------------------------------

    def release_memory(self) -> None:
        """Collective, colocated only: servers free their weights and KV cache while the trainer
        trains (the next ``refit`` brings them back)."""
        if not self.args.colocate or self._released:
            return
        on_rank0(lambda: self._check(self.client.release_memory_occupation(), "/release_memory_occupation"))
        self._released = True

    def _resume(self, tags: list[str]) -> None:
        self._check(self.client.resume_memory_occupation(tags=tags), "/resume_memory_occupation")

    @staticmethod
    def _check(results: dict[str, Any], what: str) -> None:
        failed = {u: r for u, r in results.items() if isinstance(r, dict) and not r.get("success", True)}
        if failed:
            raise RefitError(f"{what} failed: {failed}")


def check_rollout_args(args: argparse.Namespace) -> None:
    """Rollout settings that cannot work, named with their values (before anything starts)."""
    from sfpo_megatron.rollout.transport import TransportUnavailableError

    if args.rollout_backend == "external" and not args.rollout_urls:
        raise RolloutConfigError("--rollout-backend external needs --rollout-urls URL [URL ...]")
    if args.rollout_urls and args.rollout_backend != "external":
        raise RolloutConfigError(f"--rollout-urls {' '.join(args.rollout_urls)} given with --rollout-backend "
                         f"{args.rollout_backend}: use --rollout-backend external to connect to them")
    if args.rollout_num_servers < 1:
        raise RolloutConfigError(f"--rollout-num-servers must be >= 1, got {args.rollout_num_servers}")
    if args.update_weight_buffer_size <= 0:
        raise RolloutConfigError(f"--update-weight-buffer-size must be positive, got {args.update_weight_buffer_size}")
    if args.weight_transport == "tensor" and not args.colocate:
        raise TransportUnavailableError("--weight-transport tensor passes CUDA IPC handles between processes "
                                        "on the same GPUs: it needs --colocate")

