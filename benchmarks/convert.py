"""Conversion benchmark: time and peak memory of HF → megatron (torch_dist) → HF.

    .venv/bin/python benchmarks/convert.py [--dtype bf16|fp32] [--layers 24]

Model: random weights of Qwen2-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocab 151936, tied embeddings). Each direction runs as its own process, exactly
as a user runs the tools (``tools/convert_hf_to_mcore.py``, then ``tools/convert_mcore_to_hf.py``,
one process, TP=1). Memory:

* ``peak RSS``: the tool process's RSS high-water mark (``VmHWM`` of /proc/PID/status, read
  every 0.1 s while it runs; ``ru_maxrss`` is unusable here since Linux carries the parent's
  high-water mark into the child);
* ``peak PSS, tree``: the largest sampled sum of PSS over the tool and its children
  (dist_checkpointing's writer processes), shared pages counted once;
* ``baseline``: RSS of a process that only imports torch / megatron / transformers and sets up
  the process group, i.e. what any tool costs before touching weights.

Peak memory is reported as a multiple of the model's bytes (goal < 1.5x), both raw and above the
baseline. The round trip is checked bit-exact. Prints a table, writes
benchmarks/results/convert.json.
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
import threading
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "convert.json"
BASELINE_SNIPPET = """
import megatron.core.models.gpt, transformers, safetensors.torch
from sfpo_megatron.distributed import parallel
from sfpo_megatron.distributed.platform import setup_platform
import sfpo_megatron.conversion.hf_mapping, sfpo_megatron.components.checkpoint
setup_platform(); parallel.initialize(tp=1, pp=1, seed=0)
parallel.destroy()
"""


def make_hf_model(path: Path, layers: int, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(path)


def _vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(cmd: list[str]) -> dict:
    """Run ``cmd``; wall time, its RSS high-water mark, and the peak PSS of its process tree."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak_pss = peak_rss = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_pss, peak_rss
        root = psutil.Process(proc.pid)
        while not done.is_set():
            total = 0
            try:
                peak_rss = max(peak_rss, _vm_hwm(proc.pid))
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_full_info().pss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
            except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
                return
            peak_pss = max(peak_pss, total)
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.stdout.read()
    status = proc.wait()
    done.set()
    sampler.join()
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output[-6000:]}")
    return {"seconds": wall, "peak_rss": peak_rss, "peak_pss_tree": peak_pss}


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        out = {}
        for f in d.glob("*.safetensors"):
            with safe_open(f, framework="pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return False
    for name in ia:
        with safe_open(ia[name], framework="pt") as fa, safe_open(ib[name], framework="pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            if x.dtype != y.dtype or not torch.equal(x, y):
                return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--make-model", help=argparse.SUPPRESS)  # internal: build the HF model there
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.make_model:
        make_hf_model(Path(args.make_model), args.layers, dtype)
        return
    work = Path(tempfile.mkdtemp(prefix="bench_convert_"))
    py = sys.executable
    try:
        hf, mcore, back = work / "hf", work / "mcore", work / "back"
        build_s = measure([py, __file__, "--make-model", str(hf), "--layers", str(args.layers),
                           "--dtype", args.dtype])["seconds"]
        model_bytes = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
        baseline = measure([py, "-c", BASELINE_SNIPPET])
        to_mcore = measure([py, "tools/convert_hf_to_mcore.py", "--hf-dir", str(hf),
                            "--save", str(mcore)])
        ckpt_bytes = sum(f.stat().st_size for f in (mcore / "iter_0000000").rglob("*")
                         if f.is_file())
        to_hf = measure([py, "tools/convert_mcore_to_hf.py", "--load", str(mcore),
                         "--save", str(back)])
        exact = same_tensors(hf, back)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    base = baseline["peak_rss"]
    rows = []
    for name, r in (("HF -> megatron (torch_dist)", to_mcore), ("megatron -> HF", to_hf)):
        rows.append({
            "step": name, "seconds": round(r["seconds"], 2),
            "peak_rss_gb": round(r["peak_rss"] / 1e9, 3),
            "peak_rss_x_model": round(r["peak_rss"] / model_bytes, 2),
            "peak_rss_above_baseline_x_model": round((r["peak_rss"] - base) / model_bytes, 2),
            "peak_pss_tree_gb": round(r["peak_pss_tree"] / 1e9, 3),
            "peak_pss_tree_x_model": round(r["peak_pss_tree"] / model_bytes, 2),
        })
    result = {
        "model": f"Qwen2-0.5B shape, {args.layers} layers, random, {args.dtype}",
        "model_bytes": model_bytes, "checkpoint_bytes": ckpt_bytes,
        "baseline_rss_gb": round(base / 1e9, 3), "round_trip_bit_exact": exact,
        "hf_model_build_seconds": round(build_s, 1), "rows": rows,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "omp_threads": os.environ.get("OMP_NUM_THREADS")},
    }
    print(f"model: {result['model']}: {model_bytes / 1e9:.3f} GB safetensors, "
          f"torch_dist checkpoint {ckpt_bytes / 1e9:.3f} GB; baseline process RSS "
          f"{base / 1e9:.3f} GB; round trip bit-exact: {exact}")
    header = ("step", "seconds", "peak RSS GB", "x model", "x model above baseline",
              "peak PSS tree GB", "x model")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in rows:
        print(" | ".join(str(v) for v in (
            r["step"], r["seconds"], r["peak_rss_gb"], r["peak_rss_x_model"],
            r["peak_rss_above_baseline_x_model"], r["peak_pss_tree_gb"],
            r["peak_pss_tree_x_model"])))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    key = args.dtype if args.layers == 24 else f"{args.dtype}_{args.layers}layers"
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    previous[key] = result
    RESULTS.write_text(json.dumps(previous, indent=2) + "\n")


if __name__ == "__main__":
    main()
