"""The processes `benchmarks/gpu_check.py` starts: one job each, on the device under test (CUDA, or
the CPU in a dry run) or, for the references, on the CPU (``CUDA_VISIBLE_DEVICES=""``).

    python benchmarks/gpu_check_worker.py JOB --out RESULT.pt [--work DIR] [job options]

Jobs: ``prepare`` (tiny HF models and model configs the others read), ``platform``, ``parity``
(conversion logits and SFPO updates), ``checkpoint``, ``update_throughput``, ``rl``. Each saves a
dict with ``torch.save``.
The conversion-parity models and tokens are those of ``tests/test_convert_parity.py`` (``tests/tiny_models.py``); the SFPO
model, settings and rollout batches those of ``tests/scripts/sfpo_common.py``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform as py_platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "scripts")]

import megatron.core  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402
from sfpo_common import build_setup, make_samples, rl_args  # noqa: E402
from sfpo_update import samples as random_samples  # noqa: E402  (benchmarks/, the script's dir)
from sfpo_worker import hf_params, reinit  # noqa: E402
from tiny_models import CONVERSION, CONVERSION_MODELS, save_conversion_models, save_sfpo_model  # noqa: E402

from sfpo_megatron.arguments import build_rl_parser  # noqa: E402
from sfpo_megatron.components.adam import use_param_group_step_adam  # noqa: E402
from sfpo_megatron.components.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from sfpo_megatron.components.metrics import memory_stats, read_metrics  # noqa: E402
from sfpo_megatron.conversion.hf_mapping import load_hf_weights  # noqa: E402
from sfpo_megatron.demo.pipeline import DemoConfig, Paths, prepare, rl_flags  # noqa: E402
from sfpo_megatron.distributed import cpu_compat, parallel  # noqa: E402
from sfpo_megatron.distributed.platform import setup_platform  # noqa: E402
from sfpo_megatron.models.builder import model_provider  # noqa: E402
from sfpo_megatron.models.hf_config import load_hf_config  # noqa: E402
from sfpo_megatron.trainer.main_params import inner_optimizers, main_params  # noqa: E402
from sfpo_megatron.trainer.model_setup import build_training_setup  # noqa: E402
from sfpo_megatron.trainer.offload import TrainStateOffload  # noqa: E402
from sfpo_megatron.trainer.train_batch import collate  # noqa: E402
from sfpo_megatron.update.policy_update import PolicyUpdater  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# SFPO-update scenarios at TP=PP=DP=1: (extra flags, setting overrides) on sfpo_common.SETTINGS.
SFPO_SCENARIOS = {"fp32": ((), {}), "bf16": (("--bf16",), {}),
                  "offload": (("--sfpo-snapshot-offload",), {}),
                  # --optimizer-cpu-offload and --offload-train against the distributed optimizer
                  # without them (fp32: only the optimizer's kernels differ).
                  "distopt": (("--use-distributed-optimizer",), {}),
                  "optimizer_cpu_offload": (("--use-distributed-optimizer", "--optimizer-cpu-offload"), {}),
                  "offload_train": (("--use-distributed-optimizer",), {})}
SFPO_STEPS = (1, 2)
# The throughput model: Qwen2.5-1.5B's shape (random weights); "tiny" keeps the shape's kind.
SHAPES = {
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         max_position_embeddings=32768, tie_word_embeddings=True,
                         rope_theta=1000000.0, rms_norm_eps=1e-6),
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6),
}


MODELS, VOCAB = list(CONVERSION_MODELS), CONVERSION["vocab_size"]


def _tokens(batch: int = 2, seq: int = 48) -> torch.Tensor:
    """The conversion-parity test's token batch (same generator seed)."""
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)

def tf32_off() -> None:
    """fp32 means fp32: no TF32 in matmuls or cuDNN (also NVIDIA_TF32_OVERRIDE=0 in our env)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- jobs ---------------------------------------------------------------------------------------


def job_prepare(a) -> dict:
    """Models every other job reads, written once so device and CPU runs read the same files."""
    work = Path(a.work)
    parity = save_conversion_models(work / "hf_parity")
    sfpo = save_sfpo_model(work / "hf_sfpo")
    throughput = work / "throughput_model"
    transformers.Qwen2Config(**SHAPES[a.shape], bos_token_id=0, eos_token_id=1).save_pretrained(throughput)
    return {"parity_models": sorted(parity), "sfpo_model": str(sfpo), "throughput_model": str(throughput)}


def job_platform(a) -> dict:
    """The switch's choice, a collective on its backend, and what megatron's optimizer will be."""
    platform = setup_platform()
    parallel.initialize(tp=1, pp=1, seed=0)
    device = platform.device()
    x = torch.arange(4.0, device=device)
    dist.all_reduce(x)
    info = {
        "device_type": platform.device_type, "backend": platform.backend,
        "dist_backend": str(dist.get_backend()),
        "all_reduce_ok": bool(torch.equal(x.cpu(), torch.arange(4.0))),
        "cpu_compat_applied": cpu_compat.is_applied(),
        # cpu_compat replaces torch.cuda's API with its own functions
        "cuda_api_is_torch": torch.cuda.current_device.__module__ == "torch.cuda",
        "megatron_adam": use_param_group_step_adam(),
        "transformer_engine_installed": importlib.util.find_spec("transformer_engine") is not None,
        "apex_installed": importlib.util.find_spec("apex") is not None,
        "python": py_platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "megatron_core": megatron.core.__version__,
        "transformers": transformers.__version__,
    }
    if platform.is_cuda:
        props = torch.cuda.get_device_properties(device)
        nccl = torch.cuda.nccl.version()
        info.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                    device_memory_gib=props.total_memory / 2**30,
                    nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl))
    parallel.destroy()
    return info


def job_parity(a) -> dict:
    """The conversion logits and the SFPO-update scenarios, in one process."""
    # HF models are loaded before setup_platform(): on CPU its factory patches break
    # transformers' meta-device init (as in tests/test_convert_parity.py).
    root = Path(a.work) / "hf_parity"
    hf = {(n, d): transformers.AutoModelForCausalLM.from_pretrained(root / n, dtype=DTYPES[d]).eval()
          for n in MODELS for d in a.dtypes.split(",")}
    setup_platform()
    tf32_off()
    return {"logits": conversion_logits(root, hf),
            "sfpo": sfpo_updates(Path(a.work) / "hf_sfpo", a.scenarios)}


def conversion_logits(root: Path, hf: dict) -> dict:
    """fp32 and bf16 logits of the converted megatron model and of HF, per parity model."""
    tokens = _tokens()
    device = setup_platform().device()
    parallel.initialize(tp=1, pp=1, seed=0)
    pos = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand(tokens.shape[0], -1)
    out = {}
    for (name, dtype), hf_model in hf.items():
        model = model_provider(str(root / name), tp=1, pp=1, params_dtype=DTYPES[dtype],
                               perform_initialization=False)
        model.to(device).eval()
        load_hf_weights([model], str(root / name), str(root / name))
        with torch.no_grad():
            logits = model(tokens.to(device), pos, None)[..., :VOCAB].float().cpu()
            ref = hf_model.to(device)(tokens.to(device)).logits.float().cpu()
        out[f"{name}/{dtype}"] = {"megatron": logits, "hf": ref}
        del model, hf_model
    parallel.destroy()
    return out


def _snapshot_placement(updater) -> dict:
    copies = [c for _, _, cs in updater.snapshot.groups for c in cs]
    params = [p for _, ps, _ in updater.snapshot.groups for p in ps]
    return {"snapshot_devices": sorted({c.device.type for c in copies}),
            "snapshot_pinned": bool(copies) and all(c.is_pinned() for c in copies),
            "main_param_devices": sorted({p.device.type for p in params}),
            "snapshot_bytes": sum(c.numel() * c.element_size() for c in copies)}


def sfpo_updates(hf: Path, scenarios: str) -> dict:
    """The SFPO-update scenarios at TP=PP=DP=1: parameters (HF names) after two updates."""
    out = {}
    for name in scenarios.split(","):
        flags, overrides = SFPO_SCENARIOS[name]
        args = rl_args(hf, overrides, flags)
        reinit(1, 1, args.seed)
        setup, _ = build_setup(args, hf)
        init = hf_params(setup, hf)
        updater = PolicyUpdater(args, setup)
        where: dict = {}

        def record_snapshot(stage: str, u: PolicyUpdater, where: dict = where) -> None:
            if stage == "theta0":  # θ(s,0) was just taken
                where.update(_snapshot_placement(u))

        updater.stage_hook = record_snapshot
        metrics, cycle = [], {}
        for step in SFPO_STEPS:
            metrics.append(updater.update(make_samples(step), step))
            if name == "offload_train" and step == SFPO_STEPS[0] and torch.cuda.is_available():
                cycle = offload_cycle(setup)  # as rl/loop.py between an update and the next
        out[name] = {"params": hf_params(setup, hf), "init": init, "metrics": metrics, "snapshot": where,
                     "adam": [type(opt.optimizer).__name__ for opt in inner_optimizers(setup.optimizer)],
                     "offload_cycle": cycle}
        del updater, setup
        gc.collect()
    parallel.destroy()
    return out


def offload_cycle(setup) -> dict:
    """--offload-train's round trip: device bytes before, freed, and back after."""
    offload = TrainStateOffload(setup.model, setup.optimizer)
    before = torch.cuda.memory_allocated()
    freed = offload.to_host()
    on_host = torch.cuda.memory_allocated()
    offload.to_device()
    return {"allocated_before": before, "freed": freed, "allocated_offloaded": on_host,
            "allocated_after": torch.cuda.memory_allocated()}


def _optimizer_state(optimizer) -> dict:
    """Every inner optimizer's step counts, fp32 main params and Adam moments, on the host."""
    state: dict = {}
    for i, opt in enumerate(inner_optimizers(optimizer)):
        base = opt.optimizer
        state[f"{i}/adam"] = type(base).__name__
        state[f"{i}/steps"] = [g.get("step") for g in base.param_groups]
        for j, p in enumerate(main_params(opt)):
            state[f"{i}/main/{j}"] = p.detach().cpu().clone()
            for key, value in base.state.get(p, {}).items():
                if torch.is_tensor(value):
                    state[f"{i}/{key}/{j}"] = value.detach().cpu().clone()
    return state


def job_checkpoint(a) -> dict:
    """bf16 + distributed optimizer: updates 1-2, save, update 3 (uninterrupted); a fresh setup
    loads the checkpoint and runs update 3 again. Deterministic kernels (math SDPA, cuBLAS
    workspace config from the parent) so that equal inputs give equal outputs."""
    platform = setup_platform()
    if platform.is_cuda:
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)
    torch.use_deterministic_algorithms(True, warn_only=True)
    hf = Path(a.work) / "hf_sfpo"
    ckpt = Path(a.work) / "distopt_ckpt"
    args = rl_args(hf, {}, ("--bf16", "--use-distributed-optimizer"))
    reinit(1, 1, args.seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        setup, _ = build_setup(args, hf)
        updater = PolicyUpdater(args, setup)
        for step in (1, 2):
            updater.update(make_samples(step), step)
        save_checkpoint(str(ckpt), 2, setup.model, setup.optimizer, setup.scheduler,
                        {"policy_updater": updater.state_dict()})
        saved = _optimizer_state(setup.optimizer)
        updater.update(make_samples(3), 3)
        straight = hf_params(setup, hf)
        del updater, setup
        gc.collect()
        setup, _ = build_setup(args, hf)  # initial weights: the load must overwrite everything
        updater = PolicyUpdater(args, setup)
        loaded = load_checkpoint(str(ckpt), setup.model, setup.optimizer, setup.scheduler)
        updater.load_state_dict(loaded.extra_state["policy_updater"])
        restored = _optimizer_state(setup.optimizer)
        updater.update(make_samples(3), 3)
        resumed = hf_params(setup, hf)
    nondeterministic = sorted({str(w.message)[:200] for w in caught if "determinist" in str(w.message)})
    parallel.destroy()
    return {"saved": saved, "restored": restored, "straight": straight, "resumed": resumed,
            "nondeterministic_warnings": nondeterministic}


def matmul_ceiling(device: torch.device, sizes: list[int], reps: int) -> dict:
    """Best bf16 GEMM FLOP/s on the device (the roofline a bf16 training step can reach)."""
    best = {"flops": 0.0}
    for n in sizes:
        x = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        y = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            x @ y
        for _ in range(3):
            synchronize(device)
            t = time.perf_counter()
            for _ in range(reps):
                x @ y
            synchronize(device)
            flops = 2 * n**3 * reps / (time.perf_counter() - t)
            if flops > best["flops"]:
                best = {"flops": flops, "n": n}
        del x, y
    return best


def job_update_throughput(a) -> dict:
    """The bf16 matmul ceiling, then SFPO updates (bf16, distributed optimizer) of the
    throughput model: one warm-up, ``--updates`` timed."""
    platform = setup_platform()
    device = platform.device()
    ceiling = matmul_ceiling(device, [int(s) for s in a.matmul_sizes.split(",")], a.matmul_reps)
    model = str(Path(a.work) / "throughput_model")
    args = build_rl_parser().parse_args([
        "--model-config", model, "--bf16", "--use-distributed-optimizer", "--algorithm", "sfpo",
        "--sfpo-inner-steps", str(a.inner_steps), "--sfpo-alpha", "0.8", "--lr", "1e-6",
        "--num-rollouts", "100", "--num-steps-per-rollout", "2", "--micro-batch-size", str(a.micro_batch),
        "--rollout-max-response-len", str(a.response), "--seed", "1"])
    parallel.initialize(tp=1, pp=1, seed=args.seed)
    arch = load_hf_config(model)
    setup = build_training_setup(args, arch, total_scheduler_steps=args.num_rollouts)
    updater = PolicyUpdater(args, setup)
    samples = random_samples(arch.vocab_size, a.batch, a.prompt, a.response)
    batch = collate(samples, 0)
    updater.update(batch, 1)  # warm-up: allocates the Adam state
    times, metrics = [], {}
    for step in range(2, 2 + a.updates):
        synchronize(device)
        t = time.perf_counter()
        metrics = updater.update(batch, step)
        synchronize(device)
        times.append(time.perf_counter() - t)
    result = {"ceiling": ceiling, "update_s": statistics.median(times), "updates": len(times),
              "lengths": [[len(s.prompt_ids), len(s.response_ids)] for s in samples],
              "inner_steps": a.inner_steps, "memory": memory_stats(device),
              "params": sum(p.numel() for c in setup.model for p in c.parameters()),
              "old_logprobs_s": metrics.get("time/old_logprobs_s"),
              "snapshot_bytes": metrics.get("sfpo/snapshot_bytes")}
    parallel.destroy()
    return result


def job_rl(a) -> dict:
    """`sfpo-megatron rl`, 3 SFPO steps end to end through the CPU rollout server (its engine on
    ``--rollout-device``), on the demo's task, tokenizer and tiny Qwen2 with random weights."""
    work = Path(a.work) / "rl"
    cfg = DemoConfig.quick(out=work, rl_steps=3, rollout_prompts=4, samples_per_prompt=4,
                           mini_batches=2, sft_docs=300, train_prompts=64, eval_prompts=4,
                           eval_interval=3, sfpo_inner_steps=2)
    paths = Paths(work)
    prepare(cfg, paths)
    config = transformers.AutoConfig.from_pretrained(paths.model_config)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(paths.hf)
    run_dir = work / "run"
    flags = rl_flags(cfg, paths, "sfpo", seed=0, out=run_dir) + ["--rollout-device", a.rollout_device]
    log = work / "rl.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "sfpo_megatron.cli", "rl", *flags], stdout=f,
                              stderr=subprocess.STDOUT, timeout=a.rl_timeout, cwd=REPO, env=os.environ.copy())
    metrics_file = run_dir / "logs" / "metrics.jsonl"
    return {"returncode": proc.returncode, "log": str(log),
            "metrics": read_metrics(str(metrics_file)) if metrics_file.exists() else [],
            "rollout_device": a.rollout_device,
            "server_logs": sorted(str(p) for p in run_dir.rglob("engine_*.log"))}


JOBS = {"prepare": job_prepare, "platform": job_platform, "parity": job_parity,
        "checkpoint": job_checkpoint, "update_throughput": job_update_throughput, "rl": job_rl}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("job", choices=sorted(JOBS))
    p.add_argument("--out", required=True, help="where torch.save writes the job's result")
    p.add_argument("--work", required=True, help="the kit's work directory (models, checkpoints)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="prepare: throughput model")
    p.add_argument("--dtypes", default="fp32,bf16", help="parity: dtypes of the conversion logits")
    p.add_argument("--scenarios", default=",".join(SFPO_SCENARIOS), help="parity: SFPO scenarios")
    p.add_argument("--matmul-sizes", default="256", help="update_throughput: GEMM sizes for the ceiling")
    p.add_argument("--matmul-reps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8, help="update_throughput: samples per rollout batch")
    p.add_argument("--prompt", type=int, default=16, help="update_throughput: max prompt tokens")
    p.add_argument("--response", type=int, default=32, help="update_throughput: max response tokens")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--inner-steps", type=int, default=3)
    p.add_argument("--updates", type=int, default=1, help="update_throughput: timed updates")
    p.add_argument("--rollout-device", default="cpu", help="rl: the CPU rollout server's device")
    p.add_argument("--rl-timeout", type=float, default=300.0, help="rl: seconds for the rl run")
    a = p.parse_args(argv)
    result = JOBS[a.job](a)
    torch.save(result, a.out)
    print(json.dumps({"job": a.job, "out": a.out}), flush=True)


if __name__ == "__main__":
    main()
