"""Keeping the rollout servers on the trainer's weights: start them, refit them, share devices.

``RolloutEngines`` is built on every trainer rank; only global rank 0 speaks HTTP. Its calls that
touch the model (``start``, ``refit``) are collectives every trainer rank makes:

* **refit** (``rollout/refit.py``) through the run's transport (``distributed``: a gloo or NCCL
  broadcast group with SGLang's handshake — NCCL on a GPU trainer, except towards CPU rollout
  servers, which join gloo groups only; ``disk``: safetensors + ``/update_weights_from_disk``;
  ``tensor``: CUDA IPC, colocated GPUs only). Every server call of a refit is bounded by
  ``--refit-timeout``; a server that fails it is dropped and the run goes on with the others
  (launched CPU servers get the same bound for their side of a broadcast, so a survivor leaves
  a broken one in time to join the next group).
* **start**: for ``--rollout-backend cpu|sglang`` the current policy is exported as an HF
  directory (the same gather, written by the disk transport's writer, plus config and tokenizer
  files) and the launcher starts ``--rollout-num-servers`` engines from it at the current weight
  version (CPU servers on ``--rollout-device``); ``external`` connects to ``--rollout-urls`` and
  refits them once.
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sfpo_megatron.conversion.hf_mapping import push_unit
from sfpo_megatron.data.tokenizer import HFTokenizer
from sfpo_megatron.distributed.platform import gpu_available
from sfpo_megatron.distributed.rank0 import on_rank0, rank
from sfpo_megatron.distributed.weight_update_group import DEFAULT_GROUP_NAME
from sfpo_megatron.errors import UserError
from sfpo_megatron.rollout.client import RolloutClient
from sfpo_megatron.rollout.refit import RefitStats, config_dir, export_hf, refit_weights
from sfpo_megatron.rollout.sglang_launcher import LaunchConfig, RolloutLauncher
from sfpo_megatron.rollout.transport import RefitError, TransportUnavailableError, make_transport

log = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class RolloutConfigError(UserError):
    """Rollout flags that cannot work together, named with their values."""


def local_address(urls: Sequence[str]) -> str:
    """The address rollout servers reach this process at (a stage leader's own group)."""
    hosts = {urlparse(u if "://" in u else f"http://{u}").hostname for u in urls}
    if hosts <= set(LOCAL_HOSTS):
        return "127.0.0.1"
    return socket.gethostbyname(socket.getfqdn())


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
        self.transport = None  # on global rank 0 and on the other stages' leaders
        self._stage_client = None  # the other stages' leaders: their transport's client
        self._released = False
        check_rollout_args(args)

    # ---- start / stop --------------------------------------------------------------------------

    def start(self, model_chunks: Sequence, weight_version: int) -> list[str]:
        """Collective: servers up and serving this policy at ``weight_version``; returns their urls."""
        if self.args.rollout_backend == "external":
            urls = on_rank0(lambda: self._connect(list(self.args.rollout_urls)))
            self._connect_stage(urls)
            self.refit(model_chunks, weight_version)
            return urls
        model_dir = export_hf(model_chunks, self.hf_config, self.workdir / "hf_init", weight_version,
                              self.side_file_dirs)
        urls = on_rank0(lambda: self._launch(str(model_dir), weight_version))
        self._connect_stage(urls)
        return urls

    def _connect_stage(self, urls: list[str]) -> None:
        """The leaders of the other pushing units (pipeline stages; in MoE stages, the other
        expert-parallel ranks) get their own client and transport: each unit pushes its weights
        through its own weight-update group (rank 0's is stage 0's)."""
        unit = push_unit()
        if rank() == 0 or not unit.leader or self.args.weight_transport not in ("distributed", "disk"):
            return
        a = self.args
        self._stage_client = RolloutClient(urls, timeout=a.rollout_timeout, retries=a.rollout_retries)
        self.transport = make_transport(a.weight_transport, self._stage_client,
                                        **self._transport_kwargs(urls, unit.name, local_address(urls)))

    def _launch(self, model_path: str, weight_version: int) -> list[str]:
        a = self.args
        extra: list[str] = []
        if a.rollout_backend == "sglang":
            extra += self.sglang_args
            if a.rollout_deterministic:
                extra.append("--enable-deterministic-inference")
        else:
            extra += ["--device", a.rollout_device]
            if a.rollout_deterministic:
                # One sequence per forward: no padding or batch-shape dependent rounding, so a
                # sample depends only on (weights, prompt, seed) and a resumed run regenerates it
                # bit for bit.
                extra += ["--max-batch-size", "1"]
            # A survivor of a broken broadcast gives up within the trainer's bound and can rejoin.
            extra += ["--weight-update-timeout", str(a.refit_timeout)]
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
        a = self.args
        self.client = RolloutClient(urls, max_concurrency=a.rollout_max_concurrency,
                                    timeout=a.rollout_timeout, retries=a.rollout_retries)
        dead = [u for u, ok in self.client.health().items() if not ok]
        if dead:
            raise RefitError(f"rollout servers not healthy: {dead}")
        self.transport = make_transport(a.weight_transport, self.client,
                                        **self._transport_kwargs(urls, push_unit().name, trainer_address(urls)))
        if a.weight_transport == "distributed":
            self.transport.connect()
        log.info("rollout servers %s, weight transport %s", urls, a.weight_transport)
        return list(urls)

    def _transport_kwargs(self, urls: list[str], stage: str, address: str) -> dict[str, Any]:
        a = self.args
        kwargs: dict[str, Any] = {"bucket_bytes": a.update_weight_buffer_size, "timeout_s": a.refit_timeout}
        if a.weight_transport == "disk":
            kwargs.update(directory=str(self.workdir / "refit"), config_dir=config_dir(self.hf_config))
        elif a.weight_transport == "distributed":
            kwargs.update(master_address=address, group_name=f"{DEFAULT_GROUP_NAME}_{stage}")
            if a.rollout_backend == "cpu":
                kwargs.update(backend="gloo")  # the CPU server's groups are gloo, whatever its device
        elif a.weight_transport == "tensor":
            kwargs.update(tp_size=a.rollout_tp_size)
        return kwargs

    def close(self) -> None:
        """Rank 0: drop the weight-update group and stop launched servers (idempotent)."""
        if self.transport is not None:
            try:
                self.transport.close()
            except Exception as e:  # noqa: BLE001 - shutting down; the servers may be gone
                log.warning("closing the weight transport: %s", e)
            self.transport = None
        for client in (self.client, self._stage_client):
            if client is not None:
                client.close()
        self.client = self._stage_client = None
        if self.launcher is not None:
            self.launcher.stop()
            self.launcher = None

    # ---- weights -------------------------------------------------------------------------------

    def refit(self, model_chunks: Sequence, weight_version: int,
              after_push: Callable[[], Any] | None = None) -> RefitStats:
        """Collective: push the policy as ``weight_version`` (resuming released server memory).
        ``after_push`` runs once the weights are pushed, before the servers take their KV cache
        back (``--offload-train`` frees the trainer's memory there)."""
        if self._released:
            on_rank0(lambda: self._resume(["weights"]))
        stats = refit_weights(model_chunks, self.hf_config, self.transport, weight_version)
        if after_push is not None:
            after_push()
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
    if args.rollout_backend == "external" and not args.rollout_urls:
        raise RolloutConfigError("--rollout-backend external needs --rollout-urls URL [URL ...]")
    if args.rollout_urls and args.rollout_backend != "external":
        raise RolloutConfigError(f"--rollout-urls {' '.join(args.rollout_urls)} given with --rollout-backend "
                         f"{args.rollout_backend}: use --rollout-backend external to connect to them")
    if args.rollout_num_servers < 1:
        raise RolloutConfigError(f"--rollout-num-servers must be >= 1, got {args.rollout_num_servers}")
    if not args.refit_timeout > 0:
        raise RolloutConfigError(f"--refit-timeout must be positive, got {args.refit_timeout}")
    if args.update_weight_buffer_size <= 0:
        raise RolloutConfigError(f"--update-weight-buffer-size must be positive, got {args.update_weight_buffer_size}")
    device = getattr(args, "rollout_device", "cpu")
    if device != "cpu" and args.rollout_backend != "cpu":
        raise RolloutConfigError(f"--rollout-device {device} places the CPU rollout server's model; "
                                 f"--rollout-backend {args.rollout_backend} servers choose their own devices")
    if device == "cuda" and not gpu_available():
        raise RolloutConfigError("--rollout-device cuda: torch.cuda.is_available() is False here; "
                                 "use --rollout-device cpu")
    if args.weight_transport == "tensor" and not args.colocate:
        raise TransportUnavailableError("--weight-transport tensor passes CUDA IPC handles between processes "
                                        "on the same GPUs: it needs --colocate")



def tokenizer_side_dirs(args: argparse.Namespace, tokenizer) -> list[str]:
    """Directories whose HF tokenizer files go next to the exported weights (a SentencePiece
    model stays with the trainer: servers get token ids and the trainer decodes)."""
    if not isinstance(tokenizer, HFTokenizer):
        return []
    path = args.tokenizer_path or args.model_config
    return [path if os.path.isdir(path) else os.path.dirname(path)]
