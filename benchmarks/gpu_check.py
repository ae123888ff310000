"""GPU validation kit: the CUDA path's checks of docs/gpu-validation.md, in one command that runs
unattended in a few minutes on one GPU node.

    PYTHONPATH=$PWD:$PWD/.gpu_site python benchmarks/gpu_check.py [--out gpu_check_out]
    python benchmarks/gpu_check.py --dry-run --out DIR   # CPU, tiny sizes: the steps' plumbing

Steps (one function each; every heavy part is a process of benchmarks/gpu_check_worker.py):

1. platform: CUDA + NCCL selected, the CPU compatibility layer not applied, an NCCL all-reduce,
   which Adam megatron builds (components/adam.py where TE / apex are missing);
2. parity at TP=PP=DP=1: the conversion logit parity (tests/test_convert_parity.py's five models)
   and the SFPO update (tests/scripts/sfpo_common.py's model and batches) on CUDA, fp32 with TF32
   off against the same run on CPU, bf16 against fp32 within a tolerance calibrated by the same
   bf16 run on CPU (see ``bf16_tolerance``); ``--sfpo-snapshot-offload`` with a pinned host θ0;
   ``--optimizer-cpu-offload`` (HybridDeviceOptimizer) and ``--offload-train`` (a host round trip
   between two updates, the device memory it frees) against the distributed optimizer without them;
3. throughput of a random Qwen2.5-1.5B-shaped model, bf16 + distributed optimizer: pretraining
   (`sfpo-megatron pretrain`) and one SFPO update; tokens/s, achieved TFLOP/s against the bf16
   matmul ceiling measured in the same run, peak memory, and for the update `sfpo-megatron
   plan`'s estimate against the peak allocated memory;
4. a distributed-optimizer checkpoint save -> load -> update equal to the uninterrupted run, and
   `sfpo-megatron rl` for 3 steps through the CPU rollout server with its engine on the GPU.

Writes OUT/gpu_check.json (paths relative to OUT) and OUT/gpu_check.md, prints the table. Exit
status: 0 all checks passed, 1 a check failed or a step broke, 2 no CUDA device (without
``--dry-run``). ``--dry-run`` runs the same step functions on the CPU (GPUs hidden) with tiny
sizes; checks that need CUDA are reported as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from sfpo_megatron.errors import UserError  # noqa: E402

WORKER = REPO / "benchmarks" / "gpu_check_worker.py"
STEPS = ("platform", "parity", "throughput", "checkpoint", "rl")
FP32_LOGIT_ATOL = 1e-4  # tests/test_convert_parity.py's bound for megatron vs HF logits
# SFPO update in fp32 on the device vs on CPU, ‖Δθ‖ / ‖θ − θ0‖ (and its metrics, relative).
# tests/test_sfpo_update.py holds megatron to 1e-5 of the plain-PyTorch reference on CPU, and the
# two CPU implementations differ by 9e-6 after these two updates; another kernel library is a
# difference of the same kind, so 10x that. TF32 (10-bit mantissa) or a bf16 leak moves the
# result by 1e-2 and more.
FP32_UPDATE_REL = 1e-4
RL_LOGPROB_GAP = 1e-3  # trainer vs rollout server log-probs, same fp32 weights
BF16_UNIT_ROUNDOFF = 2.0**-9  # 8 significant bits
SIZES = {
    "cuda": dict(shape="qwen2.5-1.5b", matmul_sizes="8192,16384", matmul_reps=20, batch=32,
                 prompt=256, response=1024, micro_batch=4, inner_steps=3, updates=2,
                 pretrain_seq=2048, pretrain_micro_batch=2, pretrain_global_batch=16,
                 pretrain_iters=8),
    "dry-run": dict(shape="tiny", matmul_sizes="256", matmul_reps=5, batch=8, prompt=16,
                    response=32, micro_batch=2, inner_steps=3, updates=1, pretrain_seq=64,
                    pretrain_micro_batch=2, pretrain_global_batch=4, pretrain_iters=4),
}
# Seconds each step may take at most (less when the kit's --time-limit runs short).
STEP_TIMEOUT = {"platform": 120, "parity": 240, "throughput": 300, "checkpoint": 150, "rl": 300}


class NoCudaError(UserError):
    """The kit validates the CUDA path; without a GPU only its dry run makes sense."""


class StepError(RuntimeError):
    """A job of a step failed; the message ends with the tail of its log."""


@dataclass
class Check:
    name: str
    value: Any
    limit: str
    ok: bool | None  # None: skipped (the reason is in note)
    note: str = ""


@dataclass
class StepResult:
    step: str
    status: str = "pass"  # pass | fail | error | skipped
    seconds: float = 0.0
    checks: list[Check] = field(default_factory=list)
    measurements: dict = field(default_factory=dict)
    error: str | None = None

    def check(self, name: str, value: Any, limit: str, ok: bool | None, note: str = "") -> None:
        self.checks.append(Check(name, value, limit, None if ok is None else bool(ok), note))


@dataclass
class Kit:
    out: Path
    dry_run: bool
    deadline: float
    sizes: dict

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    @property
    def work(self) -> Path:
        return self.out / "work"

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def env(self, on: str) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["NVIDIA_TF32_OVERRIDE"] = "0"
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # deterministic cuBLAS (checkpoint step)
        env["TOKENIZERS_PARALLELISM"] = "false"
        env["HF_HUB_OFFLINE"] = "1"  # every model is a local directory; the node has no network
        if on == "cpu":  # the CPU reference runs, and every process of a dry run
            env["CUDA_VISIBLE_DEVICES"] = ""
        if self.dry_run:  # tiny models, two processes at a time on what may be two cores
            env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def start(self, name: str, cmd: list[str], on: str, timeout: float) -> Process:
        """Start a command, its output in work/logs/<name>.log."""
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env(on), cwd=REPO)
        return Process(name, proc, log, time.monotonic() + max(1.0, min(timeout, self.remaining())))

    def run(self, name: str, cmd: list[str], on: str, timeout: float) -> None:
        self.start(name, cmd, on, timeout).wait()

    def start_job(self, job: str, on: str, timeout: float, tag: str = "", **options: Any) -> Process:
        """Start one worker job on ``on`` ("device" or "cpu"); ``.result()`` waits and loads it."""
        on = self.device if on == "device" else on
        name = f"{job}{tag}_{on}"
        result = self.work / f"{name}.pt"
        cmd = [sys.executable, str(WORKER), job, "--out", str(result), "--work", str(self.work)]
        for key, value in options.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        process = self.start(name, cmd, on, timeout)
        process.result_path = result
        return process

    def job(self, job: str, on: str, timeout: float, tag: str = "", **options: Any) -> dict:
        return self.start_job(job, on, timeout, tag, **options).result()


@dataclass
class Process:
    name: str
    proc: subprocess.Popen
    log: Path
    deadline: float
    result_path: Path | None = None

    def wait(self) -> None:
        """StepError (with the end of its log) if it fails or outlives its deadline."""
        try:
            code = self.proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise StepError(f"{self.name}: no result in time{tail(self.log)}") from None
        if code != 0:
            raise StepError(f"{self.name}: exit code {code}{tail(self.log)}")

    def result(self) -> dict:
        self.wait()
        return torch.load(self.result_path, weights_only=False)


def results(processes: list[Process]) -> list[dict]:
    """Wait for all; on a failure the others are stopped before the error propagates."""
    try:
        return [p.result() for p in processes]
    finally:
        for p in processes:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()


def tail(log: Path, lines: int = 25) -> str:
    if not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return f"; last lines of {log.name}:\n" + "\n".join(text)


# ---- numbers --------------------------------------------------------------------------------------


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([params[n].double().flatten() for n in sorted(params)])


def rel_to_displacement(params: dict, ref: dict, init: dict) -> float:
    """‖θ − θ_ref‖ / ‖θ_ref − θ_init‖: relative to how far the update moved the parameters."""
    a, b, b0 = flat(params), flat(ref), flat(init)
    return ((a - b).norm() / (b - b0).norm()).item()


def bf16_tolerance(cpu_bf16_error: float) -> float:
    """A bf16 result on CUDA may differ from the fp32 reference by at most twice what the same
    bf16 computation on the CPU differs by, and never less than 4 bf16 unit roundoffs (2^-7).

    Both runs round every operand to bf16 (8 significant bits); that rounding dominates their
    distance to fp32, while the CUDA and CPU kernels' accumulation orders (both accumulate in
    fp32) are a smaller effect. Twice the CPU's own bf16 error leaves room for that effect and for
    which elements happen to round the other way; a CUDA run that loses precision somewhere (a
    bf16 accumulation, a wrong cast) lands well outside it.
    """
    return max(2.0 * cpu_bf16_error, 4 * BF16_UNIT_ROUNDOFF)


def matmul_params(cfg: dict) -> int:
    """Parameters in matmuls per token: the layers' linear weights plus the output head."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    layers = cfg["num_hidden_layers"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    return layers * (h * (h + 2 * kv) + h * h + 3 * h * f) + v * h


def train_flops(cfg: dict, lengths: list[int]) -> float:
    """Forward + backward model FLOPs of sequences of these lengths: 6 x matmul params per token
    plus attention scores and values, 12 x layers x hidden x length per token (full square)."""
    p, h, layers = matmul_params(cfg), cfg["hidden_size"], cfg["num_hidden_layers"]
    return sum(6 * p * n + 12 * layers * h * n * n for n in lengths)


def throughput_row(name: str, tokens_per_s: float, flops_per_s: float, ceiling: float,
                   peak_gib: float | None) -> dict:
    return {"case": name, "tokens_per_s": tokens_per_s, "tflops": flops_per_s / 1e12,
            "fraction_of_ceiling": flops_per_s / ceiling if ceiling else None,
            "peak_memory_gib": peak_gib, "planner_estimate_gib": None}  # rl jobs: set by the caller


# ---- steps ----------------------------------------------------------------------------------------


def step_prepare(kit: Kit) -> dict:
    """Models the steps share (the parity models, the SFPO model, the throughput config)."""
    return kit.job("prepare", "cpu", 120, shape=kit.sizes["shape"])


def step_platform(kit: Kit, r: StepResult) -> None:
    info = kit.job("platform", "device", STEP_TIMEOUT["platform"])
    r.measurements = info
    cuda = not kit.dry_run
    note = "" if cuda else "dry run: the CPU platform's expectations"
    want = ("cuda", "nccl") if cuda else ("cpu", "gloo")
    r.check("platform switch selects", f"{info['device_type']} + {info['backend']}", " + ".join(want),
            (info["device_type"], info["backend"]) == want, note)
    r.check("default process group backend", info["dist_backend"], want[1],
            info["dist_backend"] == want[1], note)
    r.check("CPU compatibility layer applied", info["cpu_compat_applied"], str(not cuda),
            info["cpu_compat_applied"] == (not cuda), note)
    r.check("torch.cuda API is torch's own", info["cuda_api_is_torch"], str(cuda),
            info["cuda_api_is_torch"] == cuda, note)
    r.check(f"all_reduce on {want[1]}", info["all_reduce_ok"], "True", info["all_reduce_ok"])
    fused = info["transformer_engine_installed"] or info["apex_installed"]
    want_adam = "param_group_step" if not fused else "transformer_engine or apex"
    r.check("megatron's Adam (no fused Adam: param-group-step)", info["megatron_adam"], want_adam,
            info["megatron_adam"] == "param_group_step" if not fused
            else info["megatron_adam"] in ("transformer_engine", "apex"))


def step_parity(kit: Kit, r: StepResult) -> None:
    dev = kit.device
    # The device run and its CPU reference side by side (the references are tiny models).
    jobs = [kit.start_job("parity", "device", STEP_TIMEOUT["parity"]),
            kit.start_job("parity", "cpu", STEP_TIMEOUT["parity"], tag="_ref", scenarios="fp32,bf16")]
    (on_dev, sf_dev), (on_cpu, sf_cpu) = [(j["logits"], j["sfpo"]) for j in results(jobs)]
    models = sorted({k.split("/")[0] for k in on_dev})
    per_model = {}
    for m in models:
        d32, d16, c32, c16 = (on_dev[f"{m}/fp32"], on_dev[f"{m}/bf16"], on_cpu[f"{m}/fp32"],
                              on_cpu[f"{m}/bf16"])
        cpu_bf16 = rel_err(c16["megatron"], c32["megatron"])
        per_model[m] = {"fp32_device_vs_cpu_max_abs": max_abs(d32["megatron"], c32["megatron"]),
                        "fp32_megatron_vs_hf_max_abs": max_abs(d32["megatron"], d32["hf"]),
                        "bf16_device_vs_fp32_cpu_rel": rel_err(d16["megatron"], c32["megatron"]),
                        "bf16_cpu_vs_fp32_cpu_rel": cpu_bf16,
                        "bf16_tolerance": bf16_tolerance(cpu_bf16),
                        "bf16_megatron_vs_hf_rel": rel_err(d16["megatron"], d16["hf"])}
    r.measurements["logits"] = per_model
    same = "dry run: the device is the CPU" if kit.dry_run else ""

    def worst(key: str) -> tuple[str, float]:
        m = max(per_model, key=lambda k: per_model[k][key])
        return m, per_model[m][key]

    m, v = worst("fp32_device_vs_cpu_max_abs")
    r.check(f"logits fp32 {dev} vs CPU, max |diff| ({len(models)} models)", f"{v:.2e} ({m})",
            f"{FP32_LOGIT_ATOL:.0e}", v < FP32_LOGIT_ATOL, same)
    m, v = worst("fp32_megatron_vs_hf_max_abs")
    r.check(f"logits fp32 megatron vs HF on {dev}, max |diff|", f"{v:.2e} ({m})",
            f"{FP32_LOGIT_ATOL:.0e}", v < FP32_LOGIT_ATOL)
    m = max(per_model, key=lambda k: per_model[k]["bf16_device_vs_fp32_cpu_rel"]
            / per_model[k]["bf16_tolerance"])
    v, tol = per_model[m]["bf16_device_vs_fp32_cpu_rel"], per_model[m]["bf16_tolerance"]
    r.check(f"logits bf16 {dev} vs fp32 CPU, relative error", f"{v:.2e} ({m})", f"{tol:.2e}", v <= tol,
            "limit: bf16_tolerance(same run in bf16 on CPU)")

    init = sf_cpu["fp32"]["init"]
    fp32_err = rel_to_displacement(sf_dev["fp32"]["params"], sf_cpu["fp32"]["params"], init)
    bf16_dev = rel_to_displacement(sf_dev["bf16"]["params"], sf_cpu["fp32"]["params"], init)
    bf16_cpu = rel_to_displacement(sf_cpu["bf16"]["params"], sf_cpu["fp32"]["params"], init)
    metric_errs = {}
    for key in ("sfpo/entropy", "sfpo/fast_displacement_norm", "sfpo/reposition_norm"):
        metric_errs[key] = max(abs(a[key] - b[key]) / max(abs(b[key]), 1e-12)
                               for a, b in zip(sf_dev["fp32"]["metrics"], sf_cpu["fp32"]["metrics"]))
    snap = sf_dev["offload"]["snapshot"]
    offload_equal = all(torch.equal(sf_dev["offload"]["params"][n], t)
                        for n, t in sf_dev["fp32"]["params"].items())
    r.measurements["sfpo"] = {"fp32_rel_to_displacement": fp32_err,
                              "fp32_metric_rel_errors": metric_errs,
                              "bf16_device_rel_to_displacement": bf16_dev,
                              "bf16_cpu_rel_to_displacement": bf16_cpu,
                              "bf16_tolerance": bf16_tolerance(bf16_cpu), "offload_snapshot": snap,
                              "metrics_device": sf_dev["fp32"]["metrics"]}
    r.check(f"SFPO update fp32 {dev} vs CPU, ‖Δθ‖ / ‖θ − θ0‖", f"{fp32_err:.2e}",
            f"{FP32_UPDATE_REL:.0e}", fp32_err < FP32_UPDATE_REL, same)
    worst_metric = max(metric_errs.values())
    r.check(f"SFPO metrics fp32 {dev} vs CPU (entropy, ‖θK−θ0‖, ‖θ̃−θ0‖), relative",
            f"{worst_metric:.2e}", f"{FP32_UPDATE_REL:.0e}", worst_metric < FP32_UPDATE_REL, same)
    tol = bf16_tolerance(bf16_cpu)
    r.check(f"SFPO update bf16 {dev} vs fp32 CPU, ‖Δθ‖ / ‖θ − θ0‖", f"{bf16_dev:.2e}", f"{tol:.2e}",
            bf16_dev <= tol, "limit: bf16_tolerance(same run in bf16 on CPU)")
    r.check("--sfpo-snapshot-offload gives the same parameters (bitwise)", offload_equal, "True",
            offload_equal)
    if kit.dry_run:
        r.check("--sfpo-snapshot-offload: θ0 in pinned host memory", snap.get("snapshot_devices"),
                "cpu, pinned", None, "needs CUDA: on CPU the snapshot is a plain copy")
    else:
        pinned = snap.get("snapshot_devices") == ["cpu"] and snap.get("snapshot_pinned") \
            and snap.get("main_param_devices") == ["cuda"]
        r.check("--sfpo-snapshot-offload: θ0 in pinned host memory",
                f"{snap.get('snapshot_devices')} pinned={snap.get('snapshot_pinned')}",
                "['cpu'] pinned=True", pinned)
    check_offload(kit, r, sf_dev)


def check_offload(kit: Kit, r: StepResult, sf_dev: dict) -> None:
    """--optimizer-cpu-offload (HybridDeviceOptimizer) and --offload-train, each against the
    distributed optimizer without it, on the device."""
    base, hybrid, cycled = sf_dev["distopt"], sf_dev["optimizer_cpu_offload"], sf_dev["offload_train"]
    init = base["init"]
    err = rel_to_displacement(hybrid["params"], base["params"], init)
    used = "HybridDeviceOptimizer" in hybrid["adam"]
    cpu_note = "dry run: a no-op on the CPU" if kit.dry_run else ""
    r.measurements["offload"] = {"optimizer_cpu_offload_rel_to_displacement": err,
                                 "optimizer_cpu_offload_adam": hybrid["adam"],
                                 "offload_train_cycle": cycled["offload_cycle"]}
    r.check("--optimizer-cpu-offload: HybridDeviceOptimizer steps the shard", hybrid["adam"],
            "HybridDeviceOptimizer", None if kit.dry_run else used, cpu_note)
    r.check("--optimizer-cpu-offload SFPO update vs on-device Adam, ‖Δθ‖ / ‖θ − θ0‖", f"{err:.2e}",
            f"{FP32_UPDATE_REL:.0e}", err < FP32_UPDATE_REL, cpu_note)
    same = all(torch.equal(cycled["params"][n], t) for n, t in base["params"].items())
    r.check("--offload-train: host round trip between updates gives the same parameters (bitwise)",
            same, "True", same, cpu_note)
    cycle = cycled["offload_cycle"]
    if kit.dry_run:
        r.check("--offload-train: device memory freed while offloaded", "-", "> 90 % of allocated",
                None, "needs CUDA")
    else:
        share = cycle["freed"] / max(cycle["allocated_before"], 1)
        r.check("--offload-train: device memory freed while offloaded",
                f"{cycle['freed'] / 2**20:.1f} MiB ({share:.0%})", "> 90 % of allocated", share > 0.9)


def step_throughput(kit: Kit, r: StepResult) -> None:
    s = kit.sizes
    cfg = json.loads((kit.work / "throughput_model" / "config.json").read_text())
    upd = kit.job("update_throughput", "device", STEP_TIMEOUT["throughput"],
                  matmul_sizes=s["matmul_sizes"], matmul_reps=s["matmul_reps"], batch=s["batch"],
                  prompt=s["prompt"], response=s["response"], micro_batch=s["micro_batch"],
                  inner_steps=s["inner_steps"], updates=s["updates"])
    ceiling = upd["ceiling"]["flops"]
    lengths = [p + q for p, q in upd["lengths"]]
    # K fast passes + the slow pass train; the old-log-prob forward is a third of a pass.
    update_flops = (upd["inner_steps"] + 1 + 1 / 3) * train_flops(cfg, lengths)
    rows = [throughput_row(f"SFPO update, K={upd['inner_steps']} (bf16, distributed optimizer)",
                           sum(lengths) / upd["update_s"], update_flops / upd["update_s"], ceiling,
                           _peak_gib(upd["memory"]))]
    update_row = rows[0]
    update_row["planner_estimate_gib"] = planner_gib(kit, s, max(lengths))

    logs = kit.work / "pretrain_logs"
    kit.run("pretrain", [sys.executable, "-m", "sfpo_megatron.cli", "pretrain",
                         "--model-config", str(kit.work / "throughput_model"), "--mock-data", "--bf16",
                         "--use-distributed-optimizer", "--seq-length", str(s["pretrain_seq"]),
                         "--micro-batch-size", str(s["pretrain_micro_batch"]),
                         "--global-batch-size", str(s["pretrain_global_batch"]),
                         "--train-iters", str(s["pretrain_iters"]), "--lr", "1e-5", "--split", "100,0,0",
                         "--log-interval", "1", "--log-dir", str(logs)],
            kit.device, STEP_TIMEOUT["throughput"])
    lines = (logs / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines if line.strip()]
    timed = metrics[2:] or metrics  # the first two iterations are warm-up
    tokens_per_s = statistics.median(m["tokens_per_second"] for m in timed)
    peak = max((_peak_gib(m) or 0.0) for m in metrics)
    flops_per_token = train_flops(cfg, [s["pretrain_seq"]]) / s["pretrain_seq"]
    rows.insert(0, throughput_row("pretraining (bf16, distributed optimizer)", tokens_per_s,
                                  tokens_per_s * flops_per_token, ceiling, peak))
    r.measurements = {"model": cfg, "params": upd["params"], "matmul_ceiling": upd["ceiling"],
                      "rows": rows, "sizes": s, "pretrain_losses": [m["lm_loss"] for m in metrics],
                      "update_old_logprobs_s": upd["old_logprobs_s"], "update_s": upd["update_s"]}
    for row in rows:
        frac = row["fraction_of_ceiling"]
        r.check(f"{row['case']}: achieved / measured bf16 matmul ceiling", f"{frac:.1%}", "(0, 100%]",
                frac is not None and 0 < frac <= 1, "a measurement, not a target")
    peak, planned = update_row["peak_memory_gib"], update_row["planner_estimate_gib"]
    if kit.dry_run or peak is None:
        r.check("memory planner vs the SFPO update's peak allocated GPU memory", planned, "within 25 %",
                None, "needs CUDA: the dry run's peak is the process's RSS")
    else:
        err = (planned - peak) / peak
        r.check("memory planner vs the SFPO update's peak allocated GPU memory",
                f"{planned:.2f} vs {peak:.2f} GiB ({err:+.0%})", "within 25 %", abs(err) <= 0.25,
                "planner without refit buffers: this job pushes no weights")
    r.check("pretraining loss finite", all(math.isfinite(m["lm_loss"]) for m in metrics), "True",
            all(math.isfinite(m["lm_loss"]) for m in metrics))


def planner_gib(kit: Kit, s: dict, seq_length: int) -> float:
    """`sfpo-megatron plan` for the throughput job's SFPO update: the most loaded rank's GiB,
    less the refit buffers (the job pushes no weights)."""
    cmd = [sys.executable, "-m", "sfpo_megatron.cli", "plan",
           "--model-config", str(kit.work / "throughput_model"), "--gpus", "1", "--gpu-memory", "1TB",
           "--bf16", "--use-distributed-optimizer", "--algorithm", "sfpo",
           "--sfpo-inner-steps", str(s["inner_steps"]), "--sfpo-alpha", "0.8",
           "--rollout-batch-size", str(s["batch"]), "--n-samples-per-prompt", "1",
           "--num-steps-per-rollout", "2", "--micro-batch-size", str(s["micro_batch"]),
           "--seq-length", str(seq_length), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=kit.env("cpu"), timeout=120,
                          check=True)
    ranks = json.loads(proc.stdout)["ranks"]
    return max(r["total"] - r["refit_buffers"] for r in ranks) / 2**30


def _peak_gib(mem: dict) -> float | None:
    for key in ("memory/max_allocated_gib", "memory/peak_rss_gib"):
        if key in mem:
            return float(mem[key])
    return None


def step_checkpoint(kit: Kit, r: StepResult) -> None:
    res = kit.job("checkpoint", "device", STEP_TIMEOUT["checkpoint"])
    saved, restored = res["saved"], res["restored"]
    tensors = [k for k, v in saved.items() if torch.is_tensor(v)]
    state_diff = [k for k in saved if k not in restored or (
        not torch.equal(saved[k], restored[k]) if torch.is_tensor(saved[k])
        else saved[k] != restored[k])]
    steps = [v for k, v in saved.items() if k.endswith("/steps")]
    r.measurements = {"adam": sorted({v for k, v in saved.items() if k.endswith("/adam")}),
                      "steps_at_save": steps,
                      "tensors_compared": len(tensors), "state_mismatches": state_diff[:20],
                      "nondeterministic_warnings": res["nondeterministic_warnings"]}
    r.check("distributed-optimizer state after load = at save (step, fp32 mains, Adam moments)",
            f"{len(tensors) - len([k for k in state_diff if k in tensors])}/{len(tensors)} tensors equal, "
            f"steps {steps}", "all equal", not state_diff and all(s and s[0] for s in steps))
    diffs = {n: max_abs(res["resumed"][n], t) for n, t in res["straight"].items()}
    worst = max(diffs.values())
    r.check(f"update after save -> load on {kit.device} = uninterrupted update (bitwise)",
            f"max |diff| {worst:.2e}", "0", worst == 0.0,
            "" if worst == 0.0 or not res["nondeterministic_warnings"]
            else "nondeterministic kernels were used: see measurements")


def step_rl(kit: Kit, r: StepResult) -> None:
    res = kit.job("rl", "device", STEP_TIMEOUT["rl"], rollout_device=kit.device,
                  rl_timeout=max(30, min(STEP_TIMEOUT["rl"], kit.remaining()) - 20))
    steps = {m["iteration"]: m for m in res["metrics"]}
    last = steps.get(3, {})
    r.measurements = {"returncode": res["returncode"], "log": rel(Path(res["log"]), kit.out),
                      "server_logs": [rel(Path(p), kit.out) for p in res["server_logs"]],
                      "rollout_device": res["rollout_device"],
                      "metrics": [steps[i] for i in sorted(steps)]}
    r.check("`sfpo-megatron rl` exit code", res["returncode"], "0", res["returncode"] == 0)
    r.check("RL steps logged", sorted(i for i in steps if i > 0), "[1, 2, 3]",
            sorted(i for i in steps if i > 0) == [1, 2, 3])
    r.check("weights refitted each step (weight_version at step 3)", last.get("weight_version"), "3",
            last.get("weight_version") == 3)
    gaps = [steps[i].get("rollout/train_inference_logprob_gap", math.inf) for i in (1, 2, 3) if i in steps]
    gap = max(gaps) if gaps else math.inf
    r.check(f"trainer vs rollout server ({kit.device}) log-prob gap", f"{gap:.2e}", f"{RL_LOGPROB_GAP:.0e}",
            gap < RL_LOGPROB_GAP)


STEP_FUNCTIONS: dict[str, Callable[[Kit, StepResult], None]] = {
    "platform": step_platform, "parity": step_parity, "throughput": step_throughput,
    "checkpoint": step_checkpoint, "rl": step_rl}


# ---- report ---------------------------------------------------------------------------------------


def rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def run_step(kit: Kit, name: str) -> StepResult:
    r = StepResult(name)
    if kit.remaining() < 20:
        r.status, r.error = "skipped", "the kit's --time-limit ran out"
        return r
    t = time.monotonic()
    try:
        STEP_FUNCTIONS[name](kit, r)
    except Exception as e:  # noqa: BLE001 - a broken step is reported; the others still run
        r.status, r.error = "error", f"{type(e).__name__}: {e}"
    r.seconds = time.monotonic() - t
    if r.status == "pass" and any(c.ok is False for c in r.checks):
        r.status = "fail"
    print(f"[gpu_check] {name}: {r.status} ({r.seconds:.0f} s)", flush=True)
    return r


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def markdown(report: dict) -> str:
    where = report["device"] if report["mode"] == "cuda" else "dry run on CPU (GPUs hidden)"
    lines = [f"# GPU validation kit: {report['date']}, {where}", "",
             f"Result: **{'passed' if report['passed'] else 'FAILED'}** in {report['seconds']:.0f} s "
             f"({report['python']}, torch {report['torch']}).", "",
             "| step | check | value | limit | result |", "| --- | --- | --- | --- | --- |"]
    for s in report["steps"]:
        if s["error"]:
            first = s["error"].splitlines()[0][:160]
            lines.append(f"| {s['step']} | ({s['status']}) | {first} | | {s['status']} |")
        for c in s["checks"]:
            result = {True: "pass", False: "FAIL", None: "skipped"}[c["ok"]]
            note = f" ({c['note']})" if c["note"] else ""
            lines.append(f"| {s['step']} | {c['name']} | {fmt(c['value'])} | {c['limit']} | {result}{note} |")
    rows = next((s["measurements"].get("rows") for s in report["steps"] if s["step"] == "throughput"), None)
    if rows:
        ceiling = next(s["measurements"]["matmul_ceiling"] for s in report["steps"]
                       if s["step"] == "throughput")
        lines += ["", f"Throughput (bf16 matmul ceiling measured in this run: {ceiling['flops'] / 1e12:.1f} "
                  f"TFLOP/s at n = {ceiling.get('n')}):", "",
                  "| case | tokens/s | TFLOP/s | of ceiling | peak memory GiB | memory planner |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for row in rows:
            frac = row["fraction_of_ceiling"]
            peak = "n/a" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.2f}"
            plan = row["planner_estimate_gib"]
            plan = "no estimate (plans rl jobs)" if plan is None else f"{plan:.2f}"
            lines.append(f"| {row['case']} | {row['tokens_per_s']:,.0f} | {row['tflops']:.2f} | "
                         f"{'n/a' if frac is None else f'{frac:.1%}'} | {peak} | {plan} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", type=Path, default=Path("gpu_check_out"),
                   help="output directory: gpu_check.json, gpu_check.md, work/ (default gpu_check_out)")
    p.add_argument("--dry-run", action="store_true",
                   help="run the steps on CPU with tiny sizes (GPUs hidden): the plumbing, for CI")
    p.add_argument("--only", default=",".join(STEPS),
                   help=f"comma-separated steps to run, of {','.join(STEPS)} (default: all)")
    p.add_argument("--time-limit", type=float, default=480.0,
                   help="seconds for the whole kit; steps that would start later are skipped (default 480)")
    a = p.parse_args(argv)
    only = [s for s in a.only.split(",") if s]
    try:
        unknown = sorted(set(only) - set(STEPS))
        if unknown:
            raise UserError(f"--only: unknown steps {unknown}; choose from {', '.join(STEPS)}")
        if not a.dry_run and not torch.cuda.is_available():
            raise NoCudaError("no CUDA device is visible (torch.cuda.is_available() is False): the kit "
                              "validates the CUDA path and needs a GPU node; --dry-run runs its steps' "
                              "plumbing on CPU")
    except UserError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 2
    a.out = a.out.resolve()  # the jobs run from the repository root
    mode = "dry-run" if a.dry_run else "cuda"
    t0 = time.monotonic()
    kit = Kit(out=a.out, dry_run=a.dry_run, deadline=t0 + a.time_limit, sizes=SIZES[mode])
    kit.work.mkdir(parents=True, exist_ok=True)
    report: dict = {"kit": "benchmarks/gpu_check.py", "mode": mode,
                    "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "node": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
                    "sizes": kit.sizes}
    steps: list[StepResult] = []
    try:
        report["prepared"] = {k: rel(Path(v), a.out) if isinstance(v, str) else v
                              for k, v in step_prepare(kit).items()}
    except Exception as e:  # noqa: BLE001 - without the models no step can run
        steps.append(StepResult("prepare", "error", error=f"{type(e).__name__}: {e}"))
        only = []
    for name in only:
        steps.append(run_step(kit, name))
    if a.dry_run:
        report["dry_run"] = ["GPUs hidden: CPU + gloo with the compatibility layer checked, not CUDA + NCCL",
                             "device-vs-CPU comparisons compare the CPU with itself",
                             "the pinned host snapshot is not checked (CUDA only)",
                             "tiny sizes instead of the Qwen2.5-1.5B shape"]
    # The parent never initialises CUDA (an exclusive-process GPU would refuse its jobs).
    info = next((s.measurements for s in steps if s.step == "platform"), {})
    report["device"] = info.get("device_name", "cpu" if a.dry_run else "cuda (no platform step)")
    report["steps"] = [asdict(s) for s in steps]
    report["seconds"] = time.monotonic() - t0
    report["passed"] = all(s.status in ("pass", "skipped") for s in steps) and bool(steps)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    table = markdown(report)
    (a.out / "gpu_check.md").write_text(table)
    print(table)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
