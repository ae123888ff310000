"""Rollout benchmark: CPU server generation throughput and weight-refit bandwidth.

    .venv/bin/python benchmarks/rollout.py [--layers 24] [--prompts 8] [--new-tokens 32] [--threads 1]

1. Generated tokens/s of the CPU rollout server (all prompts sent concurrently, batched by the
   server) vs a plain ``transformers.generate`` loop over the same prompts and weights (one prompt per
   call: the baseline the server is measured against, rollouts generated with plain HF transformers),
   plus one batched ``generate`` call for reference. Greedy, no EOS, so every run produces
   prompts x new_tokens tokens.
2. Refit throughput (GB/s) of the disk and distributed (gloo) transports, end to end (pack, send,
   server loads, version verified), vs this machine's memcpy bandwidth (torch copy of a large tensor).

Model: random weights of Qwen2-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocab 151936, tied embeddings), fp32. Prints a table and writes
benchmarks/results/rollout.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from sfpo_megatron.rollout.client import RolloutClient
from sfpo_megatron.rollout.sglang_launcher import LaunchConfig, RolloutLauncher
from sfpo_megatron.rollout.transport import DiskTransport, DistributedTransport

REPO = Path(__file__).resolve().parents[1]


def repo_relative(path: str | Path) -> str | None:
    """``path`` relative to the repository root for the results JSON; None outside the repository
    (a machine's scratch directory means nothing on another machine)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else None


def build_model(path: Path, layers: int) -> tuple[torch.nn.Module, float]:
    from transformers import AutoModelForCausalLM, Qwen2Config

    start = time.perf_counter()
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(path)
    return model, time.perf_counter() - start


def memcpy_gbps(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return nbytes / 1e9 / best


@torch.no_grad()
def hf_loop(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    outs = []
    for p in prompts:
        out = model.generate(torch.tensor([p]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        outs.append(out[0, len(p):].tolist())
    return time.perf_counter() - start, outs


@torch.no_grad()
def hf_batched(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> float:
    start = time.perf_counter()
    model.generate(torch.tensor(prompts), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="alternating server / batched-HF runs; best kept")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, same for the server and the baseline")
    ap.add_argument("--bucket-bytes", type=int, default=512 * 1024**2, help="--update-weight-buffer-size")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "rollout.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="rollout_bench_"))
    model_dir = work / "model"
    # The results hold no machine paths: --workdir (scratch) is left out, --out is repo-relative.
    config = {k: v for k, v in vars(args).items() if k not in ("workdir", "out")}
    config |= {"out": repo_relative(args.out), "machine": platform.machine(), "cpus": os.cpu_count(),
               "torch": torch.__version__}
    results: dict = {"config": config}
    try:
        model, build_s = build_model(model_dir, args.layers)
        n_params = sum(p.numel() for p in model.parameters())
        results["model"] = {"params": n_params, "layers": args.layers, "build_and_save_s": build_s}
        print(f"model: {n_params / 1e6:.1f}M params, {args.layers} layers, built+saved in {build_s:.1f}s")

        g = torch.Generator().manual_seed(1)
        prompts = torch.randint(0, 151936, (args.prompts, args.prompt_len), generator=g).tolist()
        total = args.prompts * args.new_tokens

        cfg = LaunchConfig(model_path=str(model_dir), backend="cpu", log_dir=str(work / "logs"), health_timeout_s=900,
                           extra_args=["--num-threads", str(args.threads)], env={"OMP_NUM_THREADS": str(args.threads)})
        with RolloutLauncher(cfg) as launcher:
            client = RolloutClient(launcher.urls, max_concurrency=args.prompts, timeout=3600)
            sp = {"temperature": 0, "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}
            client.generate(prompts[:1], {**sp, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
            hf_batched(model, prompts[:1], 2)
            # The machine is shared: alternate the runs and keep each one's best.
            server_s, batched_s = [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                served = client.generate(prompts, sp)
                server_s.append(time.perf_counter() - start)
                batched_s.append(hf_batched(model, prompts, args.new_tokens))
            server_tokens = sum(len(row[0].output_ids) for row in served)
            loop_s, loop_outs = hf_loop(model, prompts, args.new_tokens)
            same = sum(row[0].output_ids == ref for row, ref in zip(served, loop_outs))
            results["generation"] = {
                "prompts": args.prompts, "new_tokens": args.new_tokens, "tokens": total,
                "server_runs_s": server_s, "hf_batched_runs_s": batched_s, "hf_loop_s": loop_s,
                "server_tokens_per_s": server_tokens / min(server_s),
                "hf_generate_loop_tokens_per_s": total / loop_s,
                "hf_generate_batched_tokens_per_s": total / min(batched_s),
                "speedup_vs_loop": (server_tokens / min(server_s)) / (total / loop_s),
                "greedy_outputs_equal_hf": f"{same}/{args.prompts}",
            }

            named = list(model.named_parameters())  # unique tensors: the tied lm_head is sent once
            nbytes = sum(t.numel() * t.element_size() for _, t in named)
            refit = {"memcpy_before_gb_per_s": memcpy_gbps()}
            for label, directory in (("disk", work / "refit"), ("disk_dev_shm", Path("/dev/shm") / work.name)):
                if label == "disk_dev_shm" and not Path("/dev/shm").is_dir():
                    continue
                with DiskTransport(client, directory, bucket_bytes=args.bucket_bytes) as dt:
                    s = dt.push(((n, t.detach()) for n, t in named), f"bench-{label}")
                refit[label] = {"gb": s.bytes / 1e9, "seconds": s.seconds, "gb_per_s": s.gb_per_s,
                                "buckets": s.num_buckets, **s.detail}
                shutil.rmtree(directory, ignore_errors=True)
            with DistributedTransport(client, bucket_bytes=args.bucket_bytes) as tr:
                tr.connect()  # group formation is a one-off; time the push itself
                s = tr.push(((n, t.detach()) for n, t in named), "bench-dist")
                refit["distributed_gloo"] = {"gb": s.bytes / 1e9, "seconds": s.seconds, "gb_per_s": s.gb_per_s, "buckets": s.num_buckets}
            refit["memcpy_gb_per_s"] = max(refit.pop("memcpy_before_gb_per_s"), memcpy_gbps())
            refit["model_gb"] = nbytes / 1e9
            results["refit"] = refit
            client.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(Path("/dev/shm") / work.name, ignore_errors=True)

    gen, rf = results["generation"], results["refit"]
    print()
    print("| measurement | value |")
    print("| --- | --- |")
    print(f"| CPU server, {gen['prompts']} prompts x {gen['new_tokens']} tokens, concurrent | {gen['server_tokens_per_s']:.1f} tok/s |")
    print(f"| transformers.generate loop (one prompt per call) | {gen['hf_generate_loop_tokens_per_s']:.1f} tok/s |")
    print(f"| transformers.generate, one batched call | {gen['hf_generate_batched_tokens_per_s']:.1f} tok/s |")
    print(f"| server / loop | {gen['speedup_vs_loop']:.2f}x (greedy equal to HF: {gen['greedy_outputs_equal_hf']}) |")
    for name in ("disk", "disk_dev_shm", "distributed_gloo"):
        if name not in rf:
            continue
        r = rf[name]
        split = f", write {r['write_s']:.1f} s + server load {r['server_load_s']:.1f} s" if "write_s" in r else ""
        print(f"| refit {name}: {r['gb']:.2f} GB in {r['buckets']} buckets | {r['seconds']:.2f} s = {r['gb_per_s']:.2f} GB/s "
              f"({r['gb_per_s'] / rf['memcpy_gb_per_s'] * 100:.0f}% of memcpy{split}) |")
    print(f"| memcpy (torch copy_, 1 GiB fp32, best of before/after) | {rf['memcpy_gb_per_s']:.2f} GB/s |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
