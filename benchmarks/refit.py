"""Refit benchmark: GB/s of the per-stage refit vs the rank-0 funnel, vs this machine's memcpy.

    .venv/bin/python benchmarks/refit.py [--layers 24] [--layouts pp1,pp2,tp2] [--repeats 2]

A CPU rollout server (``python -m sfpo_megatron.cpu_server.server``) holds a Qwen2-0.5B-shaped
policy (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocab 151936, tied
embeddings; fp32, random weights). For each layout a torchrun trainer builds the same policy in
megatron-core and refits the server through ``rollout.refit.refit_weights``, end to end (gather,
pack, send, server stages, commit, version verified):

* ``stages``: every pipeline stage's leader pushes its own tensors through its own group, flat
  buckets, double buffered (``distributed``), or writes its own shards (``disk``);
* ``funnel``: every tensor gathered to global rank 0, which pushes alone, one broadcast per tensor
  with the version on the last bucket (the refit before per-stage pushes).

Each (layout, transport, path) refits ``--repeats`` times after one warm-up (group formation is a
one-off); the best time is reported. memcpy: ``torch.Tensor.copy_`` of 1 GiB with every core's
thread, best of 5, measured before and after the refits in the same run; the wire's ceiling: the
policy's tensors broadcast one by one over gloo between two processes with nothing else to do. Prints a table; writes
benchmarks/results/refit.json (paths relative to the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import rollout as rollout_bench  # noqa: E402  (benchmarks/rollout.py)

LAYOUTS = {"pp1": (1, 1), "pp2": (1, 2), "tp2": (2, 1), "pp2tp2": (2, 2)}


def memcpy_gbps() -> float:
    """benchmarks/rollout.py's memcpy measure, with every core's thread."""
    torch.set_num_threads(os.cpu_count() or 1)
    return rollout_bench.memcpy_gbps()


def _broadcast_worker(rank: int, port: int, sizes: list[int], repeats: int, out: str) -> None:
    import time

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    make = torch.ones if rank == 0 else torch.empty
    tensors = [make(n // 4) for n in sizes]
    for t in tensors:  # connects, and faults the receiver's pages in
        dist.broadcast(t, 0)
    best = float("inf")
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        for t in tensors:
            dist.broadcast(t, 0)
        dist.barrier()
        best = min(best, time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(json.dumps(sum(sizes) / 1e9 / best))
    dist.destroy_process_group()


def gloo_broadcast_gbps(sizes: list[int], work: Path, repeats: int = 5) -> float:
    """The wire's ceiling: the refit's own messages (``sizes``: the policy's tensors, in bytes)
    broadcast one by one between two processes on this machine, warm buffers on both ends and
    nothing else to do; best of ``repeats``."""
    import torch.multiprocessing as mp

    from sfpo_megatron.rollout.sglang_launcher import find_free_port

    out = work / "broadcast.json"
    mp.spawn(_broadcast_worker, args=(find_free_port("127.0.0.1"), sizes, repeats, str(out)), nprocs=2)
    return json.loads(out.read_text())


def tensor_bytes(model_dir: Path) -> list[int]:
    """Each tensor's bytes in the saved (fp32) policy, in file order."""
    from safetensors import safe_open

    sizes = []
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                sl = sf.get_slice(name)
                sizes.append(4 * int(torch.Size(sl.get_shape()).numel()))
    return sizes


def save_model(path: Path, layers: int) -> None:
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)


def worker(args: argparse.Namespace) -> None:
    """One layout, under torchrun: every (transport, path) refit, rank 0 writes the timings."""
    import torch.distributed as dist

    from sfpo_megatron.conversion.hf_mapping import push_unit
    from sfpo_megatron.distributed import parallel
    from sfpo_megatron.models.builder import model_provider
    from sfpo_megatron.rollout.client import RolloutClient
    from sfpo_megatron.rollout.refit import refit_weights
    from sfpo_megatron.rollout.transport import DiskTransport, DistributedTransport

    tp, pp = LAYOUTS[args.layout]
    parallel.initialize(tp=tp, pp=pp, seed=0)
    # Values do not matter for bandwidth: uninitialised parameters of the right shapes.
    model = [model_provider(args.model, tp=tp, pp=pp, perform_initialization=False, transformer_impl="local")]
    unit = push_unit()
    version = args.version_base
    results = {}
    for transport_name in args.transports.split(","):
        for path in ("stages", "funnel"):
            funnel = path == "funnel"
            transport = None
            if unit.leader and (not funnel or dist.get_rank() == 0):
                client = RolloutClient([args.url], timeout=600)
                if transport_name == "disk":
                    transport = DiskTransport(client, Path(args.workdir) / f"disk_{args.layout}_{path}",
                                              bucket_bytes=args.bucket_bytes, timeout_s=600)
                else:
                    transport = DistributedTransport(client, bucket_bytes=args.bucket_bytes, backend="gloo",
                                                     group_name=f"bench_{args.layout}_{path}_{unit.name}",
                                                     timeout_s=600, staged=not funnel)
            runs = []
            for i in range(args.repeats + 1):
                version += 1
                stats = refit_weights(model, args.model, transport, version, funnel=funnel)
                if i:  # the first refit forms the groups
                    runs.append({"seconds": stats.seconds, "gb": stats.bytes / 1e9, "gb_per_s": stats.gb_per_s,
                                 "commit_s": stats.commit_s,
                                 "stages": [{"stage": s.stage, "seconds": s.seconds, "gb": s.bytes / 1e9,
                                             "gb_per_s": s.gb_per_s} for s in stats.stages]})
            best = min(runs, key=lambda r: r["seconds"])
            results[f"{transport_name}/{path}"] = {**best, "runs_s": [r["seconds"] for r in runs]}
            if dist.get_rank() == 0:
                print(f"{args.layout} {transport_name} {path}: {best['gb']:.2f} GB in {best['seconds']:.2f} s "
                      f"= {best['gb_per_s']:.2f} GB/s", flush=True)
            if transport is not None:
                transport.close()
                transport.client.close()
            dist.barrier()
    if dist.get_rank() == 0:
        Path(args.result).write_text(json.dumps(results))
    parallel.destroy()


def run_layouts(args: argparse.Namespace) -> dict:
    from sfpo_megatron.rollout.sglang_launcher import LaunchConfig, RolloutLauncher

    work = Path(args.workdir or tempfile.mkdtemp(prefix="refit_bench_"))
    model_dir = work / "model"
    print(f"saving a Qwen2-0.5B-shaped model ({args.layers} layers) to {model_dir}", flush=True)
    save_model(model_dir, args.layers)
    results: dict = {"memcpy_before_gb_per_s": memcpy_gbps(),
                     "gloo_broadcast_gb_per_s": gloo_broadcast_gbps(tensor_bytes(model_dir), work)}
    cfg = LaunchConfig(model_path=str(model_dir), backend="cpu", log_dir=str(work / "logs"), health_timeout_s=600,
                       extra_args=["--weight-update-timeout", "600"], env={"OMP_NUM_THREADS": "1"})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    layouts = {}
    try:
        with RolloutLauncher(cfg) as launcher:
            url = launcher.urls[0]
            for k, name in enumerate(args.layouts.split(",")):
                tp, pp = LAYOUTS[name]
                out = work / f"{name}.json"
                cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(tp * pp),
                       "--master_addr", "127.0.0.1", "--master_port", str(29500 + k), __file__, "--worker",
                       "--layout", name, "--model", str(model_dir), "--url", url, "--result", str(out),
                       "--transports", args.transports, "--repeats", str(args.repeats),
                       "--bucket-bytes", str(args.bucket_bytes), "--workdir", str(work),
                       "--version-base", str(1000 * (k + 1))]
                done = subprocess.run(cmd, env=env, timeout=3600)
                if done.returncode != 0:  # e.g. the shared machine ran out of memory: keep the rest
                    layouts[name] = {"error": f"trainer exited with {done.returncode}"}
                    if not all(_healthy(u) for u in launcher.urls):
                        break
                    continue
                layouts[name] = json.loads(out.read_text())
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    results["memcpy_gb_per_s"] = max(results.pop("memcpy_before_gb_per_s"), memcpy_gbps())
    results["layouts"] = layouts
    return results


def _healthy(url: str) -> bool:
    import requests

    try:
        return requests.get(url + "/health", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def report(results: dict, args: argparse.Namespace) -> None:
    mem = results["memcpy_gb_per_s"]
    print()
    wire = results["gloo_broadcast_gb_per_s"]
    print("| layout | transport | path | GB | best s | GB/s | % of memcpy | % of gloo broadcast | slowest stage s | vs funnel |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, layout in results["layouts"].items():
        if "error" in layout:
            print(f"| {name} | {layout['error']} | | | | | | | | |")
            continue
        for key, r in layout.items():
            transport, path = key.split("/")
            funnel = layout.get(f"{transport}/funnel")
            ratio = f"{r['gb_per_s'] / funnel['gb_per_s']:.2f}x" if funnel and path == "stages" else ""
            slowest = max(s["seconds"] for s in r["stages"])
            print(f"| {name} | {transport} | {path} | {r['gb']:.2f} | {r['seconds']:.2f} | {r['gb_per_s']:.2f} | "
                  f"{r['gb_per_s'] / mem * 100:.0f}% | {r['gb_per_s'] / wire * 100:.0f}% | {slowest:.2f} | {ratio} |")
    print(f"\nmemcpy (torch copy_, 1 GiB fp32, {os.cpu_count()} threads, best of 5, before/after): {mem:.2f} GB/s")
    print(f"gloo broadcast (two processes, the policy's tensors one by one, warm buffers, best of 5): "
          f"{wire:.2f} GB/s = {wire / mem * 100:.0f}% of memcpy")
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "layers": args.layers, "bucket_bytes": args.bucket_bytes, "repeats": args.repeats}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out.resolve().relative_to(REPO) if out.resolve().is_relative_to(REPO) else out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--layouts", default="pp1,pp2,tp2", help=f"comma-separated, of {sorted(LAYOUTS)}")
    ap.add_argument("--transports", default="distributed,disk")
    ap.add_argument("--repeats", type=int, default=2, help="timed refits per case, after one warm-up")
    ap.add_argument("--bucket-bytes", type=int, default=512 * 1024**2, help="--update-weight-buffer-size")
    ap.add_argument("--workdir", default=None, help="kept when given (model, server log)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "refit.json"))
    # internal: one layout's trainer under torchrun
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--layout", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--version-base", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    unknown = set(args.layouts.split(",")) - set(LAYOUTS)
    if unknown:
        ap.error(f"--layouts: unknown {sorted(unknown)}; choose from {sorted(LAYOUTS)}")
    report(run_layouts(args), args)


if __name__ == "__main__":
    main()
