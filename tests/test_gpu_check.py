"""benchmarks/gpu_check.py, the GPU validation kit, on a machine without CUDA: it refuses at once
with a clear message; ``--dry-run`` runs every step's plumbing on CPU (real processes, tiny
sizes) and passes; a step that breaks makes the kit exit non-zero with the reason in its report."""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch
from launch import PYTHON, REPO, child_env, run

KIT = str(REPO / "benchmarks" / "gpu_check.py")
STEPS = ["platform", "parity", "throughput", "checkpoint", "rl"]

@pytest.mark.skipif(torch.cuda.is_available(), reason="the kit's behaviour without CUDA")
def test_without_cuda_it_stops_at_once(tmp_path):
    t = time.monotonic()
    proc = run([PYTHON, KIT, "--out", str(tmp_path / "out")], check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "gpu_check: error: no CUDA device is visible (torch.cuda.is_available() is False): the kit "
        "validates the CUDA path and needs a GPU node; --dry-run runs its steps' plumbing on CPU")
    assert time.monotonic() - t < 60
    assert not (tmp_path / "out").exists(), "nothing may run without CUDA"


def test_unknown_step_is_refused(tmp_path):
    proc = run([PYTHON, KIT, "--dry-run", "--only", "platform,speed", "--out", str(tmp_path)], check=False)
    assert proc.returncode == 2
    assert "--only: unknown steps ['speed']" in proc.stderr


def test_help_lists_the_steps():
    out = run([PYTHON, KIT, "--help"]).stdout
    for flag in ("--dry-run", "--out", "--only", "--time-limit"):
        assert flag in out
    for step in ("platform", "parity", "throughput", "checkpoint"):
        assert step in out


def test_a_broken_step_fails_the_kit(tmp_path):
    # One second for the whole kit: the first job is stopped, nothing else starts.
    proc = run([PYTHON, KIT, "--dry-run", "--time-limit", "1", "--out", str(tmp_path)], check=False,
               timeout=120)
    assert proc.returncode == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["passed"] is False
    assert report["steps"][0]["step"] == "prepare" and report["steps"][0]["status"] == "error"
    assert "no result in time" in report["steps"][0]["error"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check")
    t = time.monotonic()
    proc = run([PYTHON, KIT, "--dry-run", "--out", str(out)], check=False, timeout=600, env=child_env())
    return {"proc": proc, "out": out, "seconds": time.monotonic() - t,
            "report": json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").exists()
            else None}


@pytest.mark.slow  # every step of the kit on CPU: about a minute
def test_dry_run_passes_every_step(dry_run):
    proc, report = dry_run["proc"], dry_run["report"]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert report["mode"] == "dry-run" and report["passed"] is True
    assert [s["step"] for s in report["steps"]] == STEPS
    for step in report["steps"]:
        assert step["status"] == "pass", step
        assert step["checks"], f"{step['step']} checked nothing"
        for check in step["checks"]:
            assert check["ok"] is True or (check["ok"] is None and check["note"]), check
    print(f"dry run: {dry_run['seconds']:.0f} s", file=sys.stderr)


@pytest.mark.slow  # shares the dry run
def test_dry_run_checks_the_plumbing_it_can(dry_run):
    steps = {s["step"]: s for s in dry_run["report"]["steps"]}
    platform = steps["platform"]["measurements"]
    assert (platform["device_type"], platform["backend"]) == ("cpu", "gloo")
    assert platform["cpu_compat_applied"] is True
    assert platform["megatron_adam"] == "param_group_step"
    logits = steps["parity"]["measurements"]["logits"]
    assert sorted(logits) == ["llama_1kv", "llama_gqa", "qwen2_tied", "qwen2_untied", "qwen3"]
    for m in logits.values():
        # bf16 really is less precise than fp32, and the tolerance comes from that measurement.
        assert 0 < m["bf16_cpu_vs_fp32_cpu_rel"] < m["bf16_tolerance"]
    skipped = [c for s in steps.values() for c in s["checks"] if c["ok"] is None]
    assert [c["name"] for c in skipped] == [
        "--sfpo-snapshot-offload: θ0 in pinned host memory",
        "--optimizer-cpu-offload: HybridDeviceOptimizer steps the shard",
        "--offload-train: device memory freed while offloaded",
        "memory planner vs the SFPO update's peak allocated GPU memory"]
    assert all("needs CUDA" in c["note"] or "no-op on the CPU" in c["note"] for c in skipped)
    offload = steps["parity"]["measurements"]["offload"]
    assert offload["optimizer_cpu_offload_rel_to_displacement"] < 1e-5  # a no-op on the CPU
    ckpt = steps["checkpoint"]["measurements"]
    assert ckpt["adam"] == ["ParamGroupStepAdamW"] and ckpt["tensors_compared"] > 0
    rows = steps["throughput"]["measurements"]["rows"]
    # The planner's estimate for the update (pretraining is not an rl job: none).
    assert rows[0]["planner_estimate_gib"] is None and rows[1]["planner_estimate_gib"] > 0
    assert all(r["tokens_per_s"] > 0 and 0 < r["fraction_of_ceiling"] <= 1 for r in rows)
    rl = steps["rl"]["measurements"]
    assert [m["iteration"] for m in rl["metrics"] if m["iteration"] > 0] == [1, 2, 3]
    assert not rl["log"].startswith("/")


@pytest.mark.slow  # shares the dry run (about a minute)
def test_report_files(dry_run):
    out = dry_run["out"]
    text = (out / "gpu_check.json").read_text()
    assert str(out) not in text, "the JSON must hold paths relative to the output directory"
    table = (out / "gpu_check.md").read_text()
    assert "| step | check | value | limit | result |" in table
    assert "no estimate (plans rl jobs)" in table
    assert table in dry_run["proc"].stdout  # the same table on stdout
