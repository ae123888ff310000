"""Helpers for the tests that submit slurm/*.sbatch to the real localhost cluster (.ci/slurm_up.sh).

Job states are read from ``scontrol show job`` (``sbatch --wait`` reports 0 for a job cancelled
while pending, and polls slowly).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = Path(os.environ.get("SFPO_SLURM_DIR", "/tmp/sfpo-slurm"))
SLURM_CONF = str(SLURM_DIR / "slurm.conf")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
ROLLOUT_SERVER = "sfpo_megatron.cpu_server.server"


def _cluster_env() -> dict:
    return {**os.environ, "SLURM_CONF": SLURM_CONF}


def cluster_is_up() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True,
                             timeout=20, env=_cluster_env())
    except (OSError, subprocess.TimeoutExpired):
        return False
    states = set(out.stdout.split("\n")) if out.returncode == 0 else set()
    return {"n1 idle", "n2 idle"} <= states or {"n1 mixed", "n2 idle"} <= states


def start_cluster() -> None:
    proc = subprocess.run(["bash", str(REPO / ".ci/slurm_up.sh")], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f".ci/slurm_up.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def stop_cluster() -> None:
    subprocess.run(["bash", str(REPO / ".ci/slurm_down.sh")], capture_output=True, timeout=120)


def job_env(**extra: str) -> dict:
    """Environment for sbatch (jobs inherit it): the cluster, this venv's python, one thread."""
    env = _cluster_env()
    for k in list(env):
        if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF":
            del env[k]
    env.update({"SFPO_PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def sbatch(script: str, args: list[str], cwd: Path, env: dict, opts: list[str] = ()) -> int:
    proc = subprocess.run(["sbatch", "--parsable", *opts, str(REPO / "slurm" / script), *args],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"sbatch {script} failed: {proc.stderr}")
    return int(proc.stdout.strip().split(";")[0])


def job_info(job: int) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job)], capture_output=True,
                         text=True, env=_cluster_env(), timeout=30)
    if out.returncode != 0:
        raise AssertionError(f"scontrol show job {job}: {out.stderr}")
    info = {}
    for field in out.stdout.split():
        key, sep, value = field.partition("=")
        if sep and key not in info:
            info[key] = value
    return info


def scontrol(*args: str) -> None:
    subprocess.run(["scontrol", *args], check=True, env=_cluster_env(), timeout=30,
                   capture_output=True)


def scancel(*args: str) -> None:
    subprocess.run(["scancel", *args], check=True, env=_cluster_env(), timeout=30,
                   capture_output=True)


def wait_job(job: int, timeout: float, release_requeued: bool = True) -> dict[str, str]:
    """Poll until the job ends. Slurm holds every requeued job for about 120 s (BeginTime); the
    hold is lifted here 5 s after the requeue (its SubmitTime): a restart within the same second
    as the requeue is refused by slurmd ("Job credential revoked")."""
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(job)
        state = info["JobState"]
        if state in TERMINAL:
            return info
        if (release_requeued and state == "PENDING" and info.get("Reason") == "BeginTime"
                and int(info.get("Restarts", "0")) > 0
                and datetime.now() - datetime.fromisoformat(info["SubmitTime"]) > timedelta(seconds=5)):
            scontrol("update", f"JobId={job}", "StartTime=now")
        if time.monotonic() > deadline:
            scancel(str(job))
            raise AssertionError(f"job {job} still {state} after {timeout:.0f}s: {info}")
        time.sleep(1.0)


def output(cwd: Path, name: str, job: int) -> str:
    path = cwd / f"{name}-{job}.out"
    return path.read_text(errors="replace") if path.exists() else f"(no {path})"


def processes_with(*needles: str) -> list[psutil.Process]:
    """Live processes whose command line contains every needle."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if all(n in cmd for n in needles) and proc.pid != os.getpid():
            found.append(proc)
    return found


def describe(cwd: Path, name: str, job: int, run_dir: Path | None = None) -> str:
    """The job's batch output and the tails of its step logs, for assertion messages."""
    text = [f"--- {name}-{job}.out ---", output(cwd, name, job)]
    if run_dir is not None and (run_dir / "logs").exists():
        for log in sorted((run_dir / "logs").rglob("*.log")):
            text += [f"--- {log.relative_to(run_dir)} (tail) ---",
                     "\n".join(log.read_text(errors="replace").splitlines()[-25:])]
    return "\n".join(text)
