"""Rollout benchmark: CPU server generation throughput and weight-refit bandwidth.

    .venv/bin/python benchmarks/rollout.py [--layers 24] [--prompts 8] [--new-tokens 32] [--threads 1]

1. Generated tokens/s of the CPU rollout server (one request per prompt, batched by the server)
   against one batched, left-padded ``transformers.generate`` call over the same prompts and weights,
   run side by side (server, then HF) in each of ``--repeats`` rounds; the ratio of each round, and
   its median, is reported because the machine may be shared. Three workloads, greedy, no EOS
   (``min_new_tokens = max_new_tokens``), so each request produces exactly its max_new_tokens:
   * uniform: ``--prompts`` prompts of ``--prompt-len`` tokens x ``--new-tokens`` new tokens, all
     sent at once; a per-prompt ``generate`` loop is timed once as well;
   * mixed: ``--prompts`` prompts of 4..48 tokens with max_new_tokens 4..64 (one at 64), all sent at
     once. The batched call must run every row to the longest (64 steps); only each request's own
     max_new_tokens count as its tokens, on both sides;
   * mixed stream: the same requests sent one every ``--stream-interval`` seconds; the server's time
     runs from the first send to the last answer, the HF call is the same one-shot batch (it could
     only start once the last prompt has arrived, which it is not charged for).
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
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
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
def hf_batched(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    """One left-padded batched ``generate`` call: (seconds, each row's new tokens)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0)
    return time.perf_counter() - start, out[:, width:].tolist()


def serve(client: RolloutClient, prompts: list[list[int]], new_tokens: list[int], interval: float) -> tuple[float, list[list[int]]]:
    """One greedy request per prompt, the i-th sent ``i * interval`` s after the first: (seconds from
    the first send to the last answer, each request's output ids)."""
    start = time.perf_counter()

    def one(i: int) -> list[int]:
        time.sleep(max(0.0, start + i * interval - time.perf_counter()))
        sp = {"temperature": 0, "max_new_tokens": new_tokens[i], "min_new_tokens": new_tokens[i]}
        out, _, _ = client.generate_raw({"input_ids": prompts[i], "sampling_params": sp, "return_logprob": True})
        return out["output_ids"]

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        outs = list(pool.map(one, range(len(prompts))))
    return time.perf_counter() - start, outs


def compare(model: torch.nn.Module, client: RolloutClient, prompts: list[list[int]], new_tokens: list[int],
            interval: float, repeats: int) -> dict:
    """``repeats`` rounds of (server, batched HF) on the same requests; per-round tokens/s, ratios,
    their medians, and how many server outputs equal the HF batch's rows (cut to max_new_tokens)."""
    tokens = sum(new_tokens)
    server_s, hf_s, ratios = [], [], []
    for _ in range(repeats):
        s_time, served = serve(client, prompts, new_tokens, interval)
        h_time, ref = hf_batched(model, prompts, max(new_tokens))
        server_s.append(s_time)
        hf_s.append(h_time)
        ratios.append(h_time / s_time)
        print(f"  server {tokens / s_time:.1f} tok/s, batched HF {tokens / h_time:.1f} tok/s: {h_time / s_time:.2f}x", flush=True)
    same = sum(out == row[:m] for out, row, m in zip(served, ref, new_tokens))
    return {
        "prompts": len(prompts), "prompt_lens": [len(p) for p in prompts], "new_tokens": new_tokens, "tokens": tokens,
        "stream_interval_s": interval, "server_runs_s": server_s, "hf_batched_runs_s": hf_s,
        "server_tokens_per_s": [tokens / t for t in server_s], "hf_batched_tokens_per_s": [tokens / t for t in hf_s],
        "ratio_runs": ratios, "ratio_median": statistics.median(ratios),
        "server_tokens_per_s_median": statistics.median(tokens / t for t in server_s),
        "hf_batched_tokens_per_s_median": statistics.median(tokens / t for t in hf_s),
        "greedy_outputs_equal_hf_batched": f"{same}/{len(prompts)}",
    }


def refit_bench(client: RolloutClient, model: torch.nn.Module, work: Path, bucket_bytes: int) -> dict:
    named = list(model.named_parameters())  # unique tensors: the tied lm_head is sent once
    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    refit = {"memcpy_before_gb_per_s": memcpy_gbps()}
    for label, directory in (("disk", work / "refit"), ("disk_dev_shm", Path("/dev/shm") / work.name)):
        if label == "disk_dev_shm" and not Path("/dev/shm").is_dir():
            continue
        with DiskTransport(client, directory, bucket_bytes=bucket_bytes) as dt:
            s = dt.push(((n, t.detach()) for n, t in named), f"bench-{label}")
        refit[label] = {"gb": s.bytes / 1e9, "seconds": s.seconds, "gb_per_s": s.gb_per_s,
                        "buckets": s.num_buckets, **s.detail}
        shutil.rmtree(directory, ignore_errors=True)
    with DistributedTransport(client, bucket_bytes=bucket_bytes) as tr:
        tr.connect()  # group formation is a one-off; time the push itself
        s = tr.push(((n, t.detach()) for n, t in named), "bench-dist")
        refit["distributed_gloo"] = {"gb": s.bytes / 1e9, "seconds": s.seconds, "gb_per_s": s.gb_per_s, "buckets": s.num_buckets}
    refit["memcpy_gb_per_s"] = max(refit.pop("memcpy_before_gb_per_s"), memcpy_gbps())
    refit["model_gb"] = nbytes / 1e9
    return refit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (server, batched HF) per workload; median reported")
    ap.add_argument("--stream-interval", type=float, default=0.1, help="seconds between requests of the mixed stream")
    ap.add_argument("--no-refit", action="store_true", help="generation only")
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
            print("uniform:", flush=True)
            gen = {"uniform": compare(model, client, prompts, [args.new_tokens] * args.prompts, 0.0, args.repeats)}
            loop_s, loop_outs = hf_loop(model, prompts, args.new_tokens)
            served = client.generate(prompts, sp)
            same = sum(row[0].output_ids == ref for row, ref in zip(served, loop_outs))
            gen["uniform"] |= {"hf_loop_s": loop_s, "hf_generate_loop_tokens_per_s": total / loop_s,
                               "greedy_outputs_equal_hf_loop": f"{same}/{args.prompts}"}
            lens = torch.randint(4, 49, (args.prompts,), generator=g).tolist()
            mixed_prompts = torch.randint(0, 151936, (args.prompts, 48), generator=g).tolist()
            mixed_prompts = [p[:n] for p, n in zip(mixed_prompts, lens)]
            new = torch.randint(4, 65, (args.prompts,), generator=g).tolist()
            new[0] = 64
            print("mixed:", flush=True)
            gen["mixed"] = compare(model, client, mixed_prompts, new, 0.0, args.repeats)
            print("mixed stream:", flush=True)
            gen["mixed_stream"] = compare(model, client, mixed_prompts, new, args.stream_interval, args.repeats)
            results["generation"] = gen

            if not args.no_refit:
                results["refit"] = refit_bench(client, model, work, args.bucket_bytes)
            client.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(Path("/dev/shm") / work.name, ignore_errors=True)

    finish(results, args)


def finish(results: dict, args: argparse.Namespace) -> None:
    gen = results["generation"]
    print()
    print("| workload | server tok/s (median) | batched HF generate tok/s (median) | server / HF per round | median | greedy equal |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in gen.items():
        rounds = " ".join(f"{x:.2f}" for x in r["ratio_runs"])
        print(f"| {name}: {r['prompts']} prompts, {r['tokens']} tokens | {r['server_tokens_per_s_median']:.1f} | "
              f"{r['hf_batched_tokens_per_s_median']:.1f} | {rounds} | {r['ratio_median']:.2f}x | "
              f"{r['greedy_outputs_equal_hf_batched']} |")
    u = gen["uniform"]
    print(f"\ntransformers.generate loop (one prompt per call, uniform): {u['hf_generate_loop_tokens_per_s']:.1f} tok/s; "
          f"server / loop {u['server_tokens_per_s_median'] / u['hf_generate_loop_tokens_per_s']:.2f}x "
          f"(greedy equal to the loop: {u['greedy_outputs_equal_hf_loop']})")
    rf = results.get("refit", {})
    if rf:
        print()
        print("| measurement | value |")
        print("| --- | --- |")
    for name in ("disk", "disk_dev_shm", "distributed_gloo"):
        if name not in rf:
            continue
        r = rf[name]
        split = f", write {r['write_s']:.1f} s + server load {r['server_load_s']:.1f} s" if "write_s" in r else ""
        print(f"| refit {name}: {r['gb']:.2f} GB in {r['buckets']} buckets | {r['seconds']:.2f} s = {r['gb_per_s']:.2f} GB/s "
              f"({r['gb_per_s'] / rf['memcpy_gb_per_s'] * 100:.0f}% of memcpy{split}) |")
    if rf:
        print(f"| memcpy (torch copy_, 1 GiB fp32, best of before/after) | {rf['memcpy_gb_per_s']:.2f} GB/s |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
