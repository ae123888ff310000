"""One SFPO update (K=3 fast passes + reposition + slow pass) vs one GRPO update on the same
rollout batch: wall time and peak memory, at DP=1 and DP=2 (distributed optimizer), as ratios.

    python benchmarks/sfpo_update.py [--updates 2] [--out benchmarks/results/sfpo_update.json]

Each (algorithm, DP) case is its own process group (``torchrun`` for DP=2) so peak memory is
not shared between cases: one warm-up update, then ``--updates`` timed ones on the same batch
(α stays α0: the entropy window is never full), one thread per rank. Expected: SFPO's training passes take about
(K+1)x GRPO's; the old-log-prob forward is done once either way, so the whole update is a bit
less than (K+1)x. SFPO's extra memory is one fp32 copy of the rank's main-param shard
(4 bytes / parameter / DP size). On CPU, peak memory is the peak RSS of the process above its
RSS before the first update; on GPU, ``torch.cuda.max_memory_allocated`` over the timed updates.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
BATCH, PROMPT, RESPONSE = 16, 32, 96  # samples per rollout batch, max prompt / response length
K = 3
FLAGS = ["--lr", "1e-5", "--num-rollouts", "100", "--num-steps-per-rollout", "2",
         "--micro-batch-size", "4", "--sfpo-inner-steps", str(K), "--sfpo-alpha", "0.8",
         "--entropy-coef", "0.001", "--rollout-max-response-len", str(RESPONSE), "--seed", "1"]


def samples(vocab: int, n: int = BATCH, prompt_len: int = PROMPT, response_len: int = RESPONSE,
            seed: int = 0) -> list:
    """Random rollout batch: groups of 4 responses with fixed advantages (also the GPU kit's)."""
    from sfpo_megatron.records import Sample

    rng = random.Random(seed)
    out = []
    for g in range(n // 4):
        prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(prompt_len // 2, prompt_len))]
        for i in range(4):
            r = rng.randint(response_len // 2, response_len)
            out.append(Sample(prompt_index=g, group_id=g, prompt_ids=prompt,
                              response_ids=[rng.randrange(2, vocab) for _ in range(r)],
                              rollout_logprobs=[-1.0] * r, weight_version=0,
                              advantage=(i - 1.5) / 1.3))
    return out


def _rss_hwm() -> int:
    """Peak RSS (VmHWM) of this process in bytes."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) * 1024


def measure_peak(cuda: bool, fn) -> int:
    """Peak memory while ``fn`` runs, above the memory in use when it starts."""
    import psutil
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
    base = psutil.Process().memory_info().rss
    fn()
    return _rss_hwm() - base


def worker(model_dir: str, algorithm: str, dp: int, updates: int, out: str) -> None:
    import torch.distributed as dist

    from sfpo_megatron.arguments import build_rl_parser
    from sfpo_megatron.distributed import parallel
    from sfpo_megatron.distributed.platform import current_platform, setup_platform
    from sfpo_megatron.models.hf_config import load_hf_config
    from sfpo_megatron.trainer.model_setup import build_training_setup
    from sfpo_megatron.trainer.train_batch import collate
    from sfpo_megatron.update.policy_update import PolicyUpdater

    setup_platform()
    flags = ["--model-config", model_dir, "--algorithm", algorithm, *FLAGS]
    if dp > 1:
        flags.append("--use-distributed-optimizer")
    args = build_rl_parser().parse_args(flags)
    parallel.initialize(tp=1, pp=1, seed=args.seed)
    arch = load_hf_config(model_dir)
    setup = build_training_setup(args, arch, total_scheduler_steps=args.num_rollouts)
    updater = PolicyUpdater(args, setup)
    batch = collate(samples(arch.vocab_size), 0)
    cuda = current_platform().is_cuda
    first = measure_peak(cuda, lambda: updater.update(batch, 1))  # also the warm-up
    times, parts, steady, snapshot = [], [], [], 0.0
    cpu_times = []
    for step in range(2, 2 + updates):
        dist.barrier()
        t, c = time.perf_counter(), time.process_time()
        m: dict = {}
        steady.append(measure_peak(cuda, lambda: m.update(updater.update(batch, step))))
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
        parts.append(m["time/update_s"] - m["time/old_logprobs_s"])
        snapshot = m["sfpo/snapshot_bytes"]
    row = {"update_s": statistics.median(times), "passes_s": statistics.median(parts),
           "update_cpu_s": statistics.median(cpu_times),
           "first_update_peak_bytes": first, "steady_update_peak_bytes": max(steady),
           "snapshot_bytes": snapshot,
           "params": sum(p.numel() for c in setup.model for p in c.parameters())}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(rows))
    parallel.destroy()


def run_case(model_dir: Path, algorithm: str, dp: int, updates: int, work: Path) -> dict:
    out = work / f"{algorithm}_dp{dp}.json"
    args = [str(Path(__file__).resolve()), "--worker", "--model", str(model_dir), "--algorithm",
            algorithm, "--dp", str(dp), "--updates", str(updates), "--result", str(out)]
    if dp == 1:
        cmd = [sys.executable] + args
    else:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(dp),
               "--master_addr", "127.0.0.1", "--master_port", str(port)] + args
    # One thread per rank: on a shared 2-core machine extra OpenMP threads only add contention.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-5000:]}")
    rows = json.loads(out.read_text())
    return {"algorithm": algorithm, "dp": dp, "params": rows[0]["params"],
            "update_s": max(r["update_s"] for r in rows),
            "update_cpu_s": max(r["update_cpu_s"] for r in rows),
            "passes_s": max(r["passes_s"] for r in rows),
            "first_update_peak_bytes": max(r["first_update_peak_bytes"] for r in rows),
            "steady_update_peak_bytes": max(r["steady_update_peak_bytes"] for r in rows),
            "snapshot_bytes_per_rank": rows[0]["snapshot_bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--updates", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sfpo_update.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--algorithm", help=argparse.SUPPRESS)
    ap.add_argument("--dp", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.model, a.algorithm, a.dp, a.updates, a.result)
        return
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        transformers.LlamaConfig(**MODEL).save_pretrained(work / "model")
        cases = {(alg, dp): run_case(work / "model", alg, dp, a.updates, work)
                 for dp in (1, 2) for alg in ("grpo", "sfpo")}
    table = []
    for dp in (1, 2):
        g, s = cases[("grpo", dp)], cases[("sfpo", dp)]
        table.append({
            "dp": dp, "grpo_update_s": g["update_s"], "sfpo_update_s": s["update_s"],
            "time_ratio": s["update_s"] / g["update_s"],
            "grpo_update_cpu_s": g["update_cpu_s"], "sfpo_update_cpu_s": s["update_cpu_s"],
            "cpu_time_ratio": s["update_cpu_s"] / g["update_cpu_s"],
            "passes_time_ratio": s["passes_s"] / g["passes_s"],
            "grpo_first_peak_mib": g["first_update_peak_bytes"] / 2**20,
            "sfpo_first_peak_mib": s["first_update_peak_bytes"] / 2**20,
            "first_memory_ratio":
                s["first_update_peak_bytes"] / max(g["first_update_peak_bytes"], 1),
            "grpo_steady_peak_mib": g["steady_update_peak_bytes"] / 2**20,
            "sfpo_steady_peak_mib": s["steady_update_peak_bytes"] / 2**20,
            "snapshot_mib_per_rank": s["snapshot_bytes_per_rank"] / 2**20})
    params = cases[("grpo", 1)]["params"]
    print(f"model {params / 1e6:.2f}M params; batch {BATCH} samples (prompt <= {PROMPT}, "
          f"response <= {RESPONSE}), 2 mini-batches, K = {K}; expected passes ratio {K + 1}")
    print("peak memory above the memory in use before the update (max over ranks): first update "
          "(allocates Adam state) and later updates")
    print("time: CPU seconds of the update process (robust on a shared machine) and wall "
          "seconds; 'passes x' is the wall ratio without the shared old-log-prob forward")
    print(f"{'DP':>3}{'GRPO cpu':>10}{'SFPO cpu':>10}{'cpu x':>7}{'GRPO s':>8}{'SFPO s':>8}"
          f"{'wall x':>8}{'passes x':>10}"
          f"{'GRPO MiB':>10}{'SFPO MiB':>10}{'mem x':>7}{'later GRPO/SFPO MiB':>21}"
          f"{'snapshot MiB':>14}")
    for r in table:
        later = f"{r['grpo_steady_peak_mib']:.1f} / {r['sfpo_steady_peak_mib']:.1f}"
        print(f"{r['dp']:>3}{r['grpo_update_cpu_s']:>10.2f}{r['sfpo_update_cpu_s']:>10.2f}"
              f"{r['cpu_time_ratio']:>7.2f}{r['grpo_update_s']:>8.2f}{r['sfpo_update_s']:>8.2f}"
              f"{r['time_ratio']:>8.2f}{r['passes_time_ratio']:>10.2f}"
              f"{r['grpo_first_peak_mib']:>10.1f}{r['sfpo_first_peak_mib']:>10.1f}"
              f"{r['first_memory_ratio']:>7.2f}{later:>21}{r['snapshot_mib_per_rank']:>14.1f}")
    result = {"model": MODEL, "params": params, "batch": BATCH, "inner_steps": K,
              "cases": list(cases.values()), "table": table}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
