"""Weight refit: every pipeline stage (and every expert-parallel rank) pushes the HF tensors it
owns, at the same time.

Each unit's leader (``conversion.hf_mapping.push_unit``: a stage's TP rank 0 of data-parallel
replica 0 for its dense tensors and expert-parallel rank 0's experts; in an MoE stage, each other
expert-parallel rank's expert-TP rank 0 for that rank's experts) runs ``iter_unit_hf_weights``:
shards are all-gathered inside the stage (experts inside their expert-TP group) and nothing
crosses pipeline stages or expert-parallel ranks. The leader streams them into its own transport:

* ``distributed``: its own weight-update group (``group_name`` ending in ``_stage{i}`` or
  ``_stage{i}_ep{r}``) with every server; buckets travel as one flat buffer each and are staged
  on the servers, not applied.
* ``disk``: its own safetensors shard files, written in parallel into one temporary directory.

Then every rank learns every unit's outcome (``all_gather_object``). If all units pushed, global
rank 0 ends the update once: ``/update_weight_version`` on every server (the CPU server applies
the staged tensors with it, atomically; see ``cpu_server/server.py``) or, for disk, one
``model.safetensors.index.json`` over all stages' shards and ``/update_weights_from_disk``; and
checks that every server reports the version. Rank 0 also checks the units together pushed every
HF tensor exactly once. A unit that failed fails the refit on every rank with the unit (stage,
expert-parallel rank), its leader's rank and the server named; the servers keep their previous
version (the staged tensors of a broken update are dropped). A unit that lost servers
mid-broadcast (``ServersDropped``) makes every unit push again to the survivors, each retry with
at least one server fewer, as before.

``tensor`` (CUDA IPC, colocated) and ``funnel=True`` (kept to measure against) take the old path:
every tensor gathered to global rank 0, which pushes alone.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sfpo_megatron.conversion.hf_mapping import (
    PushUnit,
    copy_hf_side_files,
    hf_shapes,
    iter_hf_weights,
    iter_unit_hf_weights,
    push_unit,
)
from sfpo_megatron.distributed.rank0 import rank
from sfpo_megatron.rollout.transport import DiskTransport, DistributedTransport, RefitError, ServersDropped

log = logging.getLogger(__name__)


def _label(unit: tuple[int, int]) -> str:
    """How messages name a pushing unit (stage, expert-parallel rank)."""
    stage, ep = unit
    return f"stage {stage}" + (f" expert-parallel rank {ep}" if ep else "")


@dataclass(frozen=True)
class StageStats:
    """What one pushing unit (a stage, or an expert-parallel rank's experts) pushed in the
    attempt that succeeded."""

    stage: int
    rank: int  # global rank of its leader
    num_tensors: int
    num_buckets: int
    bytes: int
    seconds: float
    names: tuple[str, ...] = ()
    ep: int = 0  # the expert-parallel rank whose experts it pushed alone; 0: the stage's own unit

    @property
    def name(self) -> str:
        return f"stage{self.stage}" + (f"_ep{self.ep}" if self.ep else "")

    @property
    def label(self) -> str:
        return _label((self.stage, self.ep))

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")


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
    stages: tuple[StageStats, ...] = ()  # one per pushing unit (the funnel: one, rank 0's)
    commit_s: float = 0.0  # ending the update on the servers, after every stage pushed

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")

    @property
    def slowest_stage(self) -> StageStats | None:
        return max(self.stages, key=lambda s: s.seconds) if self.stages else None

    def metrics(self) -> dict[str, float]:
        out = {"refit/time_s": self.seconds, "refit/gb_per_s": self.gb_per_s,
               "refit/gb": self.bytes / 1e9, "refit/num_buckets": float(self.num_buckets),
               "refit/num_tensors": float(self.num_tensors), "refit/attempts": float(self.attempts),
               "refit/servers_dropped": float(len(self.dropped)),
               "refit/num_stages": float(len({s.stage for s in self.stages})),
               "refit/num_pushers": float(len(self.stages)),
               "refit/commit_s": self.commit_s,
               "rollout/live_servers": float(self.live_servers),
               "rollout/servers_dropped_total": float(self.dropped_total)}
        for s in self.stages:
            out.update({f"refit/{s.name}_time_s": s.seconds, f"refit/{s.name}_gb": s.bytes / 1e9,
                        f"refit/{s.name}_gb_per_s": s.gb_per_s})
        slowest = self.slowest_stage
        if slowest is not None:
            out.update({"refit/slowest_stage": float(slowest.stage), "refit/slowest_stage_time_s": slowest.seconds})
        return out


def refit_weights(model_chunks: Sequence, hf_config: Any, transport, weight_version: int, *,
                  funnel: bool = False) -> RefitStats:
    """Collective: push this policy's weights as ``weight_version``. ``transport``: this rank's
    transport on each pushing unit's leader (global rank 0's also talks for the run), else None."""
    start = time.perf_counter()
    kind = _from_rank0(lambda: transport.name if transport is not None else None)
    if kind is None:
        raise RefitError("refit_weights needs a transport on global rank 0")
    per_stage = not funnel and kind in ("distributed", "disk")
    dropped: list[str] = []
    attempts = 0
    while True:
        attempts += 1
        if per_stage:
            status, value = _push_stages(model_chunks, hf_config, transport, weight_version, kind)
        else:
            status, value = _push_once(model_chunks, hf_config, transport, weight_version)
        if status == "ok":
            break
        if status == "retry":  # every rank gathers again, for a push to the surviving servers
            dropped += value
            log.warning("refit to weight_version %d lost %s; pushing again to the survivors", weight_version, value)
            continue
        raise RefitError(f"refit to weight_version {weight_version} failed: {value}")
    stages, pushed_dropped, live, total, commit_s = value
    stats = RefitStats(weight_version, sum(s.num_tensors for s in stages), sum(s.num_buckets for s in stages),
                       sum(s.bytes for s in stages), time.perf_counter() - start, attempts,
                       tuple(dropped + pushed_dropped), live, total, tuple(stages), commit_s)
    if rank() == 0 and per_stage:
        for s in stages:  # every unit's outcome reached rank 0 (other ranks log warnings only)
            log.info("refit %s (global rank %d): %d tensors (%s ... %s), %.3f GB in %.2fs (%.2f GB/s)",
                     s.label, s.rank, s.num_tensors, s.names[0] if s.names else "-",
                     s.names[-1] if s.names else "-", s.bytes / 1e9, s.seconds, s.gb_per_s)
        slowest = stats.slowest_stage
        log.info("refit to weight_version %d: %d pushing unit(s), %.3f GB in %.2fs (%.2f GB/s); slowest %s "
                 "(%.2fs); commit %.3fs", weight_version, len(stages), stats.bytes / 1e9, stats.seconds,
                 stats.gb_per_s, slowest.label, slowest.seconds, commit_s)
    return stats


def _from_rank0(fn) -> Any:
    """``fn()`` on global rank 0, its value on every rank (``fn`` must not raise)."""
    box = [fn() if rank() == 0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _live(transport) -> list[str]:
    return transport.client.live_urls() if transport is not None and transport.client is not None else []


def _push_stages(model_chunks: Sequence, hf_config: Any, transport, weight_version: int,
                 kind: str) -> tuple[str, Any]:
    """One attempt: every unit pushes its own tensors at once, then rank 0 ends the update.
    Returns the same decision on every rank: ("ok", (stages, dropped, live, dropped_total,
    commit_s)), ("retry", dropped urls) or ("error", message naming stage, rank and server)."""
    version = str(weight_version)
    # Rank 0's view of the live servers (and, for disk, the directory the stages fill) for everyone.
    plan = _from_rank0(lambda: (_live(transport), str(transport.start_version()) if kind == "disk" else None))
    live, tmp = plan
    unit = push_unit()
    if rank() == 0:
        log.info("refit via %s: pushing version %s to %d server(s) from %d stage(s)", kind, version,
                 len(live), unit.count)
    outcome: tuple | None = None
    if unit.leader:
        outcome = _push_unit(model_chunks, hf_config, transport, version, kind, unit, live, tmp)
    else:
        for _ in iter_unit_hf_weights(model_chunks, hf_config):  # a TP peer: take part in the gathers
            pass
    if dist.is_initialized() and dist.get_world_size() > 1:
        outcomes: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, outcome)
    else:
        outcomes = [outcome]
    box: list[Any] = [None]
    if rank() == 0:
        box[0] = _decide(transport, hf_config, version, kind, tmp, outcomes)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0][0] == "error" and isinstance(transport, DistributedTransport):
        # Leave the group on the servers: they drop what this stage staged, so nothing of the
        # failed update is ever applied (the next refit forms a new group).
        transport.leave()
    return box[0]


def _push_unit(model_chunks: Sequence, hf_config: Any, transport, version: str, kind: str, unit: PushUnit,
               live: list[str], tmp: str | None) -> tuple:
    """A unit's leader pushes its unit's tensors: ((stage, ep), "ok", StageStats, shards),
    ((stage, ep), "retry", dropped, message) or ((stage, ep), "error", message). The gather is
    always run to its end, for the TP peers."""
    names: list[str] = []
    weights = iter_unit_hf_weights(model_chunks, hf_config)

    def recorded() -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in weights:
            names.append(name)
            yield name, t

    start = time.perf_counter()
    try:
        if transport is None:
            raise RefitError("this pushing unit's leader has no weight transport")
        if not live:
            raise RefitError("no live rollout server")
        for url in transport.client.live_urls():  # servers rank 0 has dropped since the last refit
            if url not in live:
                transport.client.drop(url, "dropped by the refit's global rank 0")
        if kind == "distributed":
            st = transport.push_part(recorded(), version)
            stats = StageStats(unit.index, rank(), st.num_tensors, st.num_buckets, st.bytes,
                               time.perf_counter() - start, tuple(names), unit.ep)
            result: tuple = ("ok", stats, None)
        else:
            shards = transport.write_part(recorded(), tmp, unit.name)
            stats = StageStats(unit.index, rank(), len(names), len(shards), sum(s[2] for s in shards),
                               time.perf_counter() - start, tuple(names), unit.ep)
            result = ("ok", stats, shards)
    except ServersDropped as e:
        result = ("retry", e.dropped, str(e))
    except Exception as e:  # noqa: BLE001 - reported on every rank, with the stage named
        result = ("error", f"{type(e).__name__}: {e}")
    try:  # finish the gather so the TP peers are not left waiting in it
        for _ in weights:
            pass
    except Exception:  # noqa: BLE001 - the first error is the one to report
        pass
    return ((unit.index, unit.ep), *result)


def _decide(transport, hf_config: Any, version: str, kind: str, tmp: str | None, outcomes: list) -> tuple[str, Any]:
    """Global rank 0: from every unit's outcome, end the update or say why not."""
    by_stage = {o[0]: (r, o) for r, o in enumerate(outcomes) if o is not None}
    errors = [f"{_label(i)} (global rank {r}): {o[2]}" for i, (r, o) in sorted(by_stage.items()) if o[1] == "error"]
    lost = sorted({u for _, o in by_stage.values() if o[1] == "retry" for u in o[2]})
    try:
        if errors:
            return "error", "; ".join(errors)
        if lost:
            for i, (r, o) in sorted(by_stage.items()):
                if o[1] == "retry":
                    log.warning("refit %s (global rank %d): %s", _label(i), r, o[3])
            for url in lost:  # out of rank 0's rotation too (each stage dropped them from its own)
                transport.client.drop(url, f"refit to weight_version {version} failed in another stage")
            if not transport.client.live_urls():
                return "error", ("no live rollout server left: "
                                 + "; ".join(f"{u} ({w})" for u, w in transport.client.dropped))
            return "retry", lost
        stages = [o[2] for _, (_, o) in sorted(by_stage.items())]
        pushed = [n for s in stages for n in s.names]
        expected = list(hf_shapes(hf_config))
        if sorted(pushed) != sorted(expected):
            twice = sorted({n for n in pushed if pushed.count(n) > 1})
            missing = sorted(set(expected) - set(pushed))
            return "error", f"the stages pushed the wrong set of tensors: missing {missing[:3]}, twice {twice[:3]}"
        t0 = time.perf_counter()
        dropped_before = len(transport.client.dropped)
        if kind == "distributed":
            transport.commit(version)
        else:
            path, *_ = transport.finish_version(tmp, [o[3] for _, (_, o) in sorted(by_stage.items())], version)
            tmp = None
            transport.load(path, version)
        commit_dropped = [u for u, _ in transport.client.dropped[dropped_before:]]
        return "ok", (stages, commit_dropped, len(transport.client.live_urls()), len(transport.client.dropped),
                      time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - every rank raises it
        return "error", f"global rank 0 ending the update: {type(e).__name__}: {e}"
    finally:
        if tmp is not None:  # disk: a version that did not finish
            shutil.rmtree(tmp, ignore_errors=True)


def _push_once(model_chunks: Sequence, hf_config: Any, transport, weight_version: int) -> tuple[str, Any]:
    """The funnel: one gather to global rank 0, which pushes everything. Rank 0's outcome on every
    rank: ("ok", stats), ("retry", dropped urls) or ("error", message)."""
    weights = iter_hf_weights(model_chunks, hf_config)
    box: list[Any] = [None]
    start = time.perf_counter()
    if rank() == 0:
        try:
            stats = transport.push(weights, str(weight_version))
            client = transport.client
            stage = StageStats(0, 0, stats.num_tensors, stats.num_buckets, stats.bytes, time.perf_counter() - start)
            box[0] = ("ok", ([stage], stats.dropped, len(client.live_urls()), len(client.dropped), 0.0))
        except ServersDropped as e:
            box[0] = ("retry", e.dropped)
        except BaseException as e:  # noqa: BLE001 - the other ranks must finish the gather first
            box[0] = ("error", f"global rank 0: {type(e).__name__}: {e}")
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
    return box[0]


def export_hf(model_chunks: Sequence, hf_config: Any, directory: str | os.PathLike, weight_version: int,
              side_file_dirs: Sequence[str | os.PathLike] = ()) -> Path | None:
    """Collective: write the policy as a loadable HF directory (safetensors shards, config.json,
    tokenizer files found in ``side_file_dirs``), each pushing unit writing its own shards at once.
    Returns its path on rank 0, None elsewhere."""
    unit = push_unit()
    # The disk transport's writer: sharded safetensors + index, renamed into place atomically.
    writer = DiskTransport(None, directory, config_dir=config_dir(hf_config)) if unit.leader else None  # type: ignore[arg-type]
    tmp = _from_rank0(lambda: str(writer.start_version()))
    outcome = None
    weights = iter_unit_hf_weights(model_chunks, hf_config)
    if unit.leader:
        try:
            outcome = ("ok", writer.write_part(weights, tmp, unit.name))
        except Exception as e:  # noqa: BLE001 - reported on every rank
            outcome = ("error", f"{_label((unit.index, unit.ep))} (global rank {rank()}): {type(e).__name__}: {e}")
    for _ in weights:
        pass
    outcomes = [outcome]
    if dist.is_initialized() and dist.get_world_size() > 1:
        outcomes = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, ((unit.index, unit.ep), outcome) if outcome is not None else None)
        outcomes = [o[1] for o in sorted((o for o in outcomes if o is not None), key=lambda o: o[0])]
    errors = [o[1] for o in outcomes if o[0] == "error"]
    if errors:
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise RefitError(f"writing weight_version {weight_version} to {directory} failed: {'; '.join(errors)}")
    if rank() != 0:
        return None
    path, _, _, _ = writer.finish_version(tmp, [o[1] for o in outcomes], str(weight_version))
    for d in side_file_dirs:
        if os.path.isdir(d):
            copy_hf_side_files(str(d), str(path))
    return path


def config_dir(hf_config: Any) -> str | None:
    if isinstance(hf_config, (str, os.PathLike)):
        p = os.fspath(hf_config)
        return p if os.path.isdir(p) else os.path.dirname(p)
    return None
