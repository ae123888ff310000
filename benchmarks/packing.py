"""Padded vs packed micro-batches (``--use-dynamic-batch-size --max-tokens-per-gpu``): one SFPO
update (K = 3 fast passes + reposition + slow pass) on a batch with long-tailed response lengths,
side by side in one run.

    python benchmarks/packing.py [--dp 1,2] [--out benchmarks/results/packing.json]

The batch: log-normal response lengths (median 64 tokens, σ = 1.2) with a tail to 1024 (the
longest response is 1024 tokens), prompts of 16-64 tokens, on a ~20M-parameter Llama. Padded,
every row is as long as the longest sample and micro-batches hold ``--micro-batch-size`` rows;
packed, each rank's share of a mini-batch goes into micro-batches of at most ``--max-tokens-per-gpu``
tokens. Each (mode, DP) case is its own process group (``torchrun`` for DP > 1), one thread per
rank, one update from the same initial weights on the same batch. Reported: the update's wall and
CPU seconds, real tokens/s (prompt + response tokens of the batch per wall second of the update),
the padding fraction of the forwarded tokens, micro-batches per rank, and the entropy at θ0 and
after the update (equal in both modes: packing changes the layout, not the update).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=5,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
             tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
BATCH, MEDIAN, SIGMA, TAIL = 16, 64, 1.2, 1024
K = 3
MICRO_BATCH_SIZE = 2  # padded rows per micro-batch
BUDGET = 2304  # packed tokens per micro-batch: about the padded micro-batch's 2 x 1088 rows
FLAGS = ["--lr", "1e-5", "--num-rollouts", "100", "--num-steps-per-rollout", "2",
         "--micro-batch-size", str(MICRO_BATCH_SIZE), "--sfpo-inner-steps", str(K),
         "--sfpo-alpha", "0.8", "--entropy-coef", "0.001", "--rollout-max-response-len",
         str(TAIL), "--seed", "1"]


def samples(vocab: int, n: int = BATCH, seed: int = 0) -> list:
    """Groups of 4 responses, log-normal lengths (median ``MEDIAN``), the longest ``TAIL``."""
    from sfpo_megatron.records import Sample

    rng = random.Random(seed)
    lengths = [min(TAIL, max(1, round(math.exp(rng.gauss(math.log(MEDIAN), SIGMA)))))
               for _ in range(n)]
    lengths[max(range(n), key=lengths.__getitem__)] = TAIL
    out = []
    for g in range(n // 4):
        prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(16, 64))]
        for i in range(4):
            r = lengths[4 * g + i]
            out.append(Sample(prompt_index=g, group_id=g, prompt_ids=prompt,
                              response_ids=[rng.randrange(2, vocab) for _ in range(r)],
                              rollout_logprobs=[-1.0] * r, weight_version=0,
                              advantage=(i - 1.5) / 1.3))
    return out


def worker(model_dir: str, mode: str, result: str) -> None:
    import torch.distributed as dist

    from sfpo_megatron.arguments import build_rl_parser
    from sfpo_megatron.distributed import parallel
    from sfpo_megatron.distributed.platform import setup_platform
    from sfpo_megatron.models.hf_config import load_hf_config
    from sfpo_megatron.trainer.model_setup import build_training_setup
    from sfpo_megatron.trainer.train_batch import collate
    from sfpo_megatron.update.policy_update import PolicyUpdater

    setup_platform()
    flags = ["--model-config", model_dir, *FLAGS]
    if mode == "packed":
        flags += ["--use-dynamic-batch-size", "--max-tokens-per-gpu", str(BUDGET)]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        flags.append("--use-distributed-optimizer")
    args = build_rl_parser().parse_args(flags)
    parallel.initialize(tp=1, pp=1, seed=args.seed)
    arch = load_hf_config(model_dir)
    setup = build_training_setup(args, arch, total_scheduler_steps=args.num_rollouts)
    updater = PolicyUpdater(args, setup, pad_id=0)
    batch = collate(samples(arch.vocab_size), 0)
    dist.barrier()
    t, c = time.perf_counter(), time.process_time()
    m = updater.update(batch, 1)
    row = {"update_s": time.perf_counter() - t, "update_cpu_s": time.process_time() - c,
           "params": sum(p.numel() for ch in setup.model for p in ch.parameters()), **m}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        Path(result).write_text(json.dumps(rows))
    parallel.destroy()


def run_case(model_dir: Path, mode: str, dp: int, work: Path) -> dict:
    out = work / f"{mode}_dp{dp}.json"
    args = [str(Path(__file__).resolve()), "--worker", "--model", str(model_dir), "--mode", mode,
            "--result", str(out)]
    if dp == 1:
        cmd = [sys.executable] + args
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(dp),
               "--master_addr", "127.0.0.1", "--master_port", str(port)] + args
    # One thread per rank: on a shared machine extra OpenMP threads only add contention.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-5000:]}")
    rows = json.loads(out.read_text())
    m = rows[0]
    wall = max(r["update_s"] for r in rows)
    return {"mode": mode, "dp": dp, "params": m["params"], "update_s": wall,
            "update_cpu_s": max(r["update_cpu_s"] for r in rows),
            "old_logprobs_s": max(r["time/old_logprobs_s"] for r in rows),
            "real_tokens": m["batch/real_tokens"], "padding_tokens": m["batch/padding_tokens"],
            "padding_fraction": m["batch/padding_fraction"],
            "micro_batches_per_rank": m["batch/micro_batches_per_rank"],
            "real_tokens_per_s": m["batch/real_tokens"] / wall,
            "entropy_at_theta0": m["actor/entropy_at_theta0"], "entropy": m["sfpo/entropy"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dp", default="1", help="comma-separated DP sizes, e.g. 1,2")
    ap.add_argument("--out", default="benchmarks/results/packing.json",
                    help="JSON results (relative to the repository root unless absolute)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.model, a.mode, a.result)
        return
    import transformers

    dps = [int(x) for x in a.dp.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        transformers.LlamaConfig(**MODEL).save_pretrained(work / "model")
        cases = [run_case(work / "model", mode, dp, work) for dp in dps
                 for mode in ("padded", "packed")]
    table = []
    for dp in dps:
        pad, pk = (next(c for c in cases if c["dp"] == dp and c["mode"] == m)
                   for m in ("padded", "packed"))
        table.append({"dp": dp, "speedup_real_tokens_per_s":
                      pk["real_tokens_per_s"] / pad["real_tokens_per_s"],
                      "cpu_time_ratio": pad["update_cpu_s"] / pk["update_cpu_s"]})
    print(f"model {cases[0]['params'] / 1e6:.1f}M params; {BATCH} samples, response lengths "
          f"log-normal (median {MEDIAN}, sigma {SIGMA}, longest {TAIL}), prompts 16-64 tokens; "
          f"SFPO K = {K}, 2 mini-batches; padded: {MICRO_BATCH_SIZE} rows per micro-batch, "
          f"packed: <= {BUDGET} tokens; one thread per rank")
    print(f"{'DP':>3} {'mode':>7}{'update s':>10}{'cpu s':>9}{'real tok/s':>12}{'padding':>9}"
          f"{'micro/rank':>11}{'entropy θ0':>12}{'entropy':>10}")
    for c in cases:
        print(f"{c['dp']:>3} {c['mode']:>7}{c['update_s']:>10.1f}{c['update_cpu_s']:>9.1f}"
              f"{c['real_tokens_per_s']:>12.1f}{c['padding_fraction']:>9.1%}"
              f"{c['micro_batches_per_rank']:>11.0f}{c['entropy_at_theta0']:>12.6f}"
              f"{c['entropy']:>10.6f}")
    for row in table:
        print(f"DP={row['dp']}: packed / padded real tokens/s = "
              f"{row['speedup_real_tokens_per_s']:.2f}x (CPU time {row['cpu_time_ratio']:.2f}x)")
    out = Path(a.out)
    path = out if out.is_absolute() else REPO / out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "model": MODEL, "batch": {"samples": BATCH, "median": MEDIAN, "sigma": SIGMA,
                                  "longest": TAIL, "prompt": [16, 64]},
        "sfpo_inner_steps": K, "micro_batch_size": MICRO_BATCH_SIZE,
        "max_tokens_per_gpu": BUDGET, "cases": cases, "summary": table}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
