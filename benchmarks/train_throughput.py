"""Pretraining throughput on CPU: tokens/s and achieved FLOP/s of a ~20M-parameter model at DP=1,
TP=2 and DP=2 (distributed optimizer), beside this machine's measured fp32 matmul ceiling; peak
memory and optimizer-state bytes per rank.

    python benchmarks/train_throughput.py [--iters 8] [--out benchmarks/results/train_throughput.json]

Runs the real `sfpo-megatron pretrain` (torchrun for 2 ranks) on mock data and reads its
metrics.jsonl; the first two iterations are warm-up and not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
             tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
SEQ, MBS, GBS = 256, 4, 8


def matmul_ceiling(threads: int, n: int = 1024, reps: int = 20) -> float:
    """Best fp32 GEMM FLOP/s with ``threads`` threads (the roofline a training step can reach)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def n_params(cfg: dict) -> int:
    h, f, v, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    per_layer = h * (h + 2 * kv) + (h + 2 * kv) + h * h + 3 * h * f + 2 * h
    return L * per_layer + 2 * v * h + h


def flops_per_token(cfg: dict, seq: int) -> float:
    """fwd+bwd: 6 x params (matmuls) + attention scores 12 x layers x hidden x seq."""
    return 6 * n_params(cfg) + 12 * cfg["num_hidden_layers"] * cfg["hidden_size"] * seq


def run_case(name: str, nproc: int, flags: list[str], cfg_dir: Path, iters: int, work: Path) -> dict:
    out = work / name
    cmd = ["-m", "sfpo_megatron.cli", "pretrain", "--model-config", str(cfg_dir), "--mock-data",
           "--seq-length", str(SEQ), "--micro-batch-size", str(MBS), "--global-batch-size",
           str(GBS), "--train-iters", str(iters), "--log-dir", str(out), "--split", "100,0,0"] + flags
    if nproc == 1:
        cmd = [sys.executable] + cmd
    else:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(nproc),
               "--master_port", str(29700 + hash(name) % 200)] + cmd
    env = dict(os.environ, OMP_NUM_THREADS=str(2 // nproc), PYTHONPATH=str(REPO))
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    timed = rows[2:]
    return {
        "case": name, "ranks": nproc,
        "tokens_per_s": statistics.median(r["tokens_per_second"] for r in timed),
        "peak_rss_gib_rank0": max(r["memory/peak_rss_gib"] for r in rows),
        "main_param_bytes_rank0": rows[0]["optimizer/main_param_bytes"],
        "adam_state_bytes_rank0": rows[0]["optimizer/adam_state_bytes"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_throughput.json"))
    a = ap.parse_args()
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        transformers.Qwen2Config(**SHAPE).save_pretrained(work / "model")
        ceiling = matmul_ceiling(threads=2)
        cases = [run_case("dp1", 1, [], work / "model", a.iters, work),
                 run_case("tp2", 2, ["--tensor-model-parallel-size", "2"], work / "model", a.iters, work),
                 run_case("dp2_distopt", 2, ["--use-distributed-optimizer"], work / "model", a.iters, work)]
    fpt = flops_per_token(SHAPE, SEQ)
    for c in cases:
        c["achieved_flops"] = c["tokens_per_s"] * fpt
        c["fraction_of_ceiling"] = c["achieved_flops"] / ceiling
    dp1 = cases[0]
    result = {"params": n_params(SHAPE), "seq_length": SEQ, "global_batch": GBS,
              "matmul_ceiling_flops_2threads": ceiling, "flops_per_token": fpt, "cases": cases,
              "optimizer_state_ratio_dp2_vs_dp1":
                  cases[2]["adam_state_bytes_rank0"] / dp1["adam_state_bytes_rank0"]}
    print(f"model {result['params'] / 1e6:.1f}M params, seq {SEQ}, global batch {GBS}; "
          f"fp32 matmul ceiling (2 threads) {ceiling / 1e9:.1f} GFLOP/s")
    print(f"{'case':<13}{'tokens/s':>10}{'GFLOP/s':>10}{'of ceiling':>12}{'peak RSS GiB':>14}"
          f"{'main MB':>9}{'Adam MB':>9}")
    for c in cases:
        print(f"{c['case']:<13}{c['tokens_per_s']:>10.0f}{c['achieved_flops'] / 1e9:>10.2f}"
              f"{c['fraction_of_ceiling']:>12.1%}{c['peak_rss_gib_rank0']:>14.2f}"
              f"{c['main_param_bytes_rank0'] / 2**20:>9.1f}{c['adam_state_bytes_rank0'] / 2**20:>9.1f}")
    print(f"optimizer state per rank, DP=2 / DP=1: {result['optimizer_state_ratio_dp2_vs_dp1']:.3f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
