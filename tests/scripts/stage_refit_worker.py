"""torchrun worker for tests/test_refit_stages.py: megatron trainers of several layouts refit one
real CPU rollout server through ``rollout.refit.refit_weights``.

    torchrun --nproc_per_node 4 stage_refit_worker.py layouts URL PID OLD_DIR NEW_DIR OUT_DIR
    torchrun --nproc_per_node 2 stage_refit_worker.py freeze URL PID OLD_DIR NEW_DIR OUT_DIR

``layouts``: for each of PP=1, PP=2, TP=2, PP=2 x TP=2 (the rest of the 4 ranks data-parallel)
and PP=2 x TP=2 through the disk transport, the server is first reset to OLD_DIR's weights, then
a trainer holding NEW_DIR's weights refits it. Rank 0 records the version the server reports, its
greedy tokens and their logprobs, every tensor it holds (``<layout>.pt``) and what each stage
pushed.

``freeze``: PP=2 refits version 1, moves every weight, then refits version 2 while rank 0 stops
the server (SIGSTOP) once it has staged part of the update. Every rank records the error it got
and how long the refit took; rank 0 then lets the server go on (SIGCONT) and records its version,
staged tensors and weights once it has given the broken update up. Rank 0 writes ``<mode>.json``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import requests
import torch
import torch.distributed as dist

LAYOUTS = {"pp1": (1, 1, "distributed"), "pp2": (1, 2, "distributed"), "tp2": (2, 1, "distributed"),
           "pp2tp2": (2, 2, "distributed"), "pp2tp2_disk": (2, 2, "disk")}
PROMPTS = [[5, 17, 42, 99, 3], [250, 7, 7, 130], [64, 65, 66, 67, 68]]
REFIT_TIMEOUT = 3.0


def build(new_dir: str, tp: int, pp: int):
    from megatron.core import parallel_state as ps

    from sfpo_megatron.conversion.hf_mapping import load_hf_weights
    from sfpo_megatron.distributed import parallel
    from sfpo_megatron.models.builder import model_provider

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    parallel.initialize(tp=tp, pp=pp, seed=0)
    model = model_provider(new_dir, tp=tp, pp=pp, perform_initialization=False, transformer_impl="local")
    load_hf_weights([model], new_dir, new_dir)
    return [model]


def transport_for(kind: str, url: str, name: str, workdir: Path, timeout_s: float):
    """This rank's stage transport: on stage leaders only (None elsewhere)."""
    from sfpo_megatron.conversion.hf_mapping import push_unit
    from sfpo_megatron.rollout.client import RolloutClient
    from sfpo_megatron.rollout.transport import DiskTransport, DistributedTransport

    unit = push_unit()
    if not unit.leader:
        return None
    client = RolloutClient([url], timeout=60)
    if kind == "disk":
        return DiskTransport(client, workdir / name, bucket_bytes=16 * 1024, timeout_s=timeout_s)
    return DistributedTransport(client, bucket_bytes=16 * 1024, group_name=f"{name}_{unit.name}", backend="gloo",
                                timeout_s=timeout_s)


def server_state(url: str) -> dict:
    out = requests.post(url + "/generate", json={"input_ids": PROMPTS, "return_logprob": True, "sampling_params": {
        "temperature": 0, "max_new_tokens": 6, "ignore_eos": True}}, timeout=60).json()
    info = requests.get(url + "/get_server_info", timeout=10).json()
    return {"greedy": [o["output_ids"] for o in out],
            "logprobs": [[lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]] for o in out],
            "weight_version": info["weight_version"], "staged": info["internal_states"][0]["staged_tensors"]}


def server_weights(url: str, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    out = {}
    for n, shape in shapes.items():
        r = requests.post(url + "/get_weights_by_name", json={"name": n, "truncate_size": shape.numel()}, timeout=30)
        out[n] = torch.tensor(r.json(), dtype=torch.float32).reshape(shape)
    return out


def layouts(url: str, old_dir: str, new_dir: str, out: Path, shapes: dict[str, torch.Size]) -> dict:
    from sfpo_megatron.rollout.refit import refit_weights

    results = {}
    for version, (name, (tp, pp, kind)) in enumerate(LAYOUTS.items(), start=1):
        if dist.get_rank() == 0:  # back to the old weights first, so every refit has to bite
            r = requests.post(url + "/update_weights_from_disk", json={"model_path": old_dir, "weight_version": "old"},
                              timeout=60)
            assert r.json()["success"], r.text
        dist.barrier()
        model = build(new_dir, tp, pp)
        transport = transport_for(kind, url, name, out / "disk", timeout_s=60)
        stats = refit_weights(model, new_dir, transport, version)
        if dist.get_rank() == 0:
            state = server_state(url)
            torch.save(server_weights(url, shapes), out / f"{name}.pt")
            results[name] = {**state, "stages": [{"stage": s.stage, "rank": s.rank, "names": list(s.names)}
                                                 for s in stats.stages],
                             "metrics": stats.metrics()}
        if transport is not None:
            transport.close()
            transport.client.close()
    return results


def freeze(url: str, pid: int, new_dir: str, out: Path, shapes: dict[str, torch.Size]) -> dict:
    from sfpo_megatron.conversion.hf_mapping import unwrap
    from sfpo_megatron.rollout.refit import refit_weights
    from sfpo_megatron.rollout.transport import RefitError

    model = build(new_dir, 1, 2)
    transport = transport_for("distributed", url, "freeze", out, timeout_s=REFIT_TIMEOUT)
    refit_weights(model, new_dir, transport, 1)
    with torch.no_grad():
        for p in unwrap(model[0]).parameters():
            p.add_(0.25)
    dist.barrier()
    frozen_at: list[int] = []

    def stop_once_staged() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                staged = requests.get(url + "/get_server_info", timeout=2).json()["internal_states"][0]["staged_tensors"]
            except requests.RequestException:
                continue
            if staged > 0:
                os.kill(pid, signal.SIGSTOP)
                frozen_at.append(staged)
                return
            time.sleep(0.002)

    watcher = threading.Thread(target=stop_once_staged) if dist.get_rank() == 0 else None
    if watcher is not None:
        watcher.start()
    start = time.monotonic()
    try:
        refit_weights(model, new_dir, transport, 2)
        error = None
    except RefitError as e:
        error = str(e)
    elapsed = time.monotonic() - start
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, {"error": error, "elapsed": elapsed})
    if dist.get_rank() != 0:
        return {}
    watcher.join()
    os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the server gives the broken update up within its own timeout
        state = requests.get(url + "/get_server_info", timeout=10).json()
        if state["internal_states"][0]["staged_tensors"] == 0:
            break
        time.sleep(0.2)
    torch.save(server_weights(url, shapes), out / "freeze.pt")
    return {"ranks": every, "frozen_after_staged": frozen_at, "server": server_state(url)}


def main() -> None:
    import logging

    from safetensors.torch import load_file

    from sfpo_megatron.distributed import parallel

    logging.basicConfig(level=logging.INFO)
    mode, url, pid, old_dir, new_dir, out = sys.argv[1:7]
    out_dir = Path(out)
    shapes = {n: t.shape for n, t in load_file(os.path.join(new_dir, "model.safetensors")).items()}
    parallel.initialize()  # the layouts rebuild megatron's groups
    result = (layouts(url, old_dir, new_dir, out_dir, shapes) if mode == "layouts"
              else freeze(url, int(pid), new_dir, out_dir, shapes))
    if dist.get_rank() == 0:
        (out_dir / f"{mode}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()


if __name__ == "__main__":
    main()
