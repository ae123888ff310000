"""Mixture-of-experts benchmark: the policy update of a small Qwen3-MoE against a dense model with
the same active parameters, and the conversion of a Qwen3-30B-A3B-shaped checkpoint.

    python benchmarks/moe.py [--updates 3] [--convert-layers 1] [--skip-convert]

Update (``torchrun --nproc_per_node 2`` per case, one thread per rank, the distributed
optimizer, one GRPO pass per update on the same random rollout batch, one warm-up update):

* ``moe``: Qwen3-MoE, 4 layers, hidden 256, 24 experts of width 256, top-4 (~21M parameters,
  ~5M active per token), at EP=1 (experts data-parallel) and EP=2 (12 experts per rank,
  alltoall dispatcher);
* ``dense``: a Qwen3 with the MoE's active parameters (MLP width 4 x 256).

Reported: update tokens/s (response and prompt tokens of the batch over the update's wall
time), the share of the update spent inside ``all_to_all_single`` (the dispatcher's token
exchange, timed around the collective), and the router balance the update logged
(``moe/tokens_per_expert_max_over_mean``).

Conversion: a random Qwen3-30B-A3B-shaped model (hidden 2048, 128 experts of width 768, top-8,
32 heads, 4 KV heads, vocab 151936) with ``--convert-layers`` layers, bf16, through
``tools/convert_hf_to_mcore.py`` and ``tools/convert_mcore_to_hf.py`` (one process each); time,
peak RSS and peak PSS of the process tree as multiples of the model's bytes (goal < 1.5x), the
round trip checked bit-exact (measured with benchmarks/convert.py's sampler).

Prints a table and writes benchmarks/results/moe.json (paths relative to the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "moe.json"
COMMON = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
              tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
MOE = dict(num_experts=24, num_experts_per_tok=4, moe_intermediate_size=256, norm_topk_prob=True,
           intermediate_size=1024, router_aux_loss_coef=0.01)
DENSE = dict(intermediate_size=4 * 256)  # top-4 experts of width 256: the same active MLP
CASES = {"dense": ("dense", 1), "moe_ep1": ("moe", 1), "moe_ep2": ("moe", 2)}
BATCH, PROMPT, RESPONSE = 16, 64, 192
FLAGS = ["--lr", "1e-5", "--num-rollouts", "100", "--num-steps-per-rollout", "1",
         "--micro-batch-size", "4", "--algorithm", "grpo", "--use-distributed-optimizer",
         "--rollout-max-response-len", str(RESPONSE), "--seed", "1"]
QWEN3_30B_A3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                     norm_topk_prob=True, max_position_embeddings=4096, tie_word_embeddings=False,
                     rope_theta=1_000_000.0, rms_norm_eps=1e-6)


def save_model(path: Path, kind: str, dtype: torch.dtype = torch.float32, **fields) -> int:
    """A random HF model of ``kind`` (dense, moe, a3b) saved at ``path``; returns its parameters."""
    import transformers

    torch.manual_seed(0)
    if kind == "dense":
        cfg = transformers.Qwen3Config(**{**COMMON, **DENSE, **fields})
    elif kind == "moe":
        cfg = transformers.Qwen3MoeConfig(**{**COMMON, **MOE, **fields})
    else:
        cfg = transformers.Qwen3MoeConfig(**{**QWEN3_30B_A3B, **fields})
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def samples(vocab: int) -> list:
    from sfpo_megatron.records import Sample

    rng = random.Random(0)
    out = []
    for g in range(BATCH // 4):
        prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(PROMPT // 2, PROMPT))]
        for i in range(4):
            r = rng.randint(RESPONSE // 2, RESPONSE)
            out.append(Sample(prompt_index=g, group_id=g, prompt_ids=list(prompt),
                              response_ids=[rng.randrange(2, vocab) for _ in range(r)],
                              rollout_logprobs=[-1.0] * r, weight_version=0, reward=float(i % 2),
                              advantage=1.0 if i % 2 else -1.0))
    return out


def worker(model_dir: str, ep: int, updates: int, out: str) -> None:
    """One case under torchrun: warm-up + ``updates`` timed GRPO updates."""
    import torch.distributed as dist

    from sfpo_megatron.arguments import build_rl_parser
    from sfpo_megatron.conversion.hf_mapping import load_hf_weights
    from sfpo_megatron.distributed import parallel
    from sfpo_megatron.distributed.platform import setup_platform
    from sfpo_megatron.models.hf_config import load_hf_config
    from sfpo_megatron.trainer.model_setup import build_training_setup
    from sfpo_megatron.update.policy_update import PolicyUpdater

    setup_platform()
    args = build_rl_parser().parse_args(["--model-config", model_dir,
                                         "--expert-model-parallel-size", str(ep), *FLAGS])
    parallel.initialize(tp=1, pp=1, ep=ep, seed=1)
    arch = load_hf_config(model_dir)
    setup = build_training_setup(args, arch, total_scheduler_steps=100)
    load_hf_weights(setup.model, model_dir, model_dir)
    setup.optimizer.reload_model_params()
    a2a = [0.0]
    original = dist.all_to_all_single

    def timed(*a, **k):  # the dispatcher's token exchange
        t = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            a2a[0] += time.perf_counter() - t

    dist.all_to_all_single = timed
    updater = PolicyUpdater(args, setup)
    batch = samples(arch.vocab_size)
    tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in batch)
    updater.update(batch, 1)
    a2a[0] = 0.0
    times, balance = [], []
    for step in range(2, updates + 2):
        dist.barrier()
        t = time.perf_counter()
        m = updater.update(batch, step)
        times.append(time.perf_counter() - t)
        balance.append(m.get("moe/tokens_per_expert_max_over_mean"))  # None: a dense model
    if dist.get_rank() == 0:
        params = sum(p.numel() for c in setup.model for p in c.parameters())
        Path(out).write_text(json.dumps({
            "seconds_per_update": sum(times) / len(times), "tokens_per_update": tokens,
            "alltoall_share": a2a[0] / sum(times), "router_max_over_mean": balance,
            "rank0_parameters": params}))
    parallel.destroy()


def run_update_cases(work: Path, updates: int) -> list[dict]:
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    rows = []
    sizes = {}
    for kind in ("dense", "moe"):
        sizes[kind] = save_model(work / kind, kind)
    for case, (kind, ep) in CASES.items():
        out = work / f"{case}.json"
        proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29611",
                               __file__, "--worker", str(work / kind), str(ep), str(updates),
                               str(out)], env=env, cwd=REPO, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{case} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        r = json.loads(out.read_text())
        rows.append({"case": case, "expert_parallel": ep, "parameters": sizes[kind],
                     "tokens_per_s": round(r["tokens_per_update"] / r["seconds_per_update"], 1),
                     "seconds_per_update": round(r["seconds_per_update"], 3),
                     "alltoall_share": round(r["alltoall_share"], 4),
                     "router_max_over_mean": [None if x is None else round(x, 3)
                                              for x in r["router_max_over_mean"]]})
    return rows


def run_conversion(work: Path, layers: int) -> dict:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from convert import measure, same_tensors

    hf, mcore, back = work / "a3b", work / "a3b_mcore", work / "a3b_back"
    py = sys.executable
    os.environ["PYTHONPATH"] = str(REPO)  # the tools import this checkout (measure passes env)
    subprocess.run([py, __file__, "--make-a3b", str(hf), str(layers)], check=True, cwd=REPO,
                   env=dict(os.environ, PYTHONPATH=str(REPO)))
    model_bytes = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
    to_mcore = measure([py, "tools/convert_hf_to_mcore.py", "--hf-dir", str(hf), "--save",
                        str(mcore)])
    to_hf = measure([py, "tools/convert_mcore_to_hf.py", "--load", str(mcore), "--save",
                     str(back)])
    rows = [{"step": name, "seconds": round(r["seconds"], 1),
             "peak_rss_x_model": round(r["peak_rss"] / model_bytes, 2),
             "peak_pss_tree_x_model": round(r["peak_pss_tree"] / model_bytes, 2)}
            for name, r in (("HF -> megatron", to_mcore), ("megatron -> HF", to_hf))]
    return {"model": f"Qwen3-30B-A3B shape, {layers} layer(s), random, bf16",
            "model_bytes": model_bytes, "round_trip_bit_exact": same_tensors(hf, back),
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--updates", type=int, default=3)
    ap.add_argument("--convert-layers", type=int, default=1)
    ap.add_argument("--skip-convert", action="store_true")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--make-a3b", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        model_dir, ep, updates, out = args.worker
        worker(model_dir, int(ep), int(updates), out)
        return
    if args.make_a3b:
        save_model(Path(args.make_a3b[0]), "a3b", torch.bfloat16,
                   num_hidden_layers=int(args.make_a3b[1]))
        return
    work = Path(tempfile.mkdtemp(prefix="bench_moe_"))
    try:
        update_rows = run_update_cases(work, args.updates)
        conversion = None if args.skip_convert else run_conversion(work, args.convert_layers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    header = ("case", "EP", "parameters", "update tokens/s", "s / update", "alltoall share",
              "router max/mean")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in update_rows:
        print(" | ".join(str(v) for v in (r["case"], r["expert_parallel"], r["parameters"],
                                          r["tokens_per_s"], r["seconds_per_update"],
                                          r["alltoall_share"], r["router_max_over_mean"])))
    if conversion:
        print(f"\nconversion: {conversion['model']}, {conversion['model_bytes'] / 1e9:.2f} GB, "
              f"round trip bit-exact: {conversion['round_trip_bit_exact']}")
        for r in conversion["rows"]:
            print(f"{r['step']}: {r['seconds']} s, peak RSS {r['peak_rss_x_model']}x model, "
                  f"peak PSS (tree) {r['peak_pss_tree_x_model']}x model")
    result = {"update": update_rows, "conversion": conversion,
              "settings": {"batch": BATCH, "prompt": PROMPT, "response": RESPONSE,
                           "updates": args.updates, "flags": FLAGS},
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "torch": torch.__version__},
              "script": "benchmarks/moe.py"}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
