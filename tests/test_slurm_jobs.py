"""The real sbatch scripts on a real Slurm: two emulated nodes (n1, n2) on this machine, started by
.ci/slurm_up.sh when not running. CPU overrides: tiny models, gloo, the CPU rollout server, and
`--gpus-per-node=1` against the nodes' fake GPU gres (one rank per node).

Job states come from `scontrol show job` (`sbatch --wait` reports 0 for a job cancelled while
pending). The colocated failure path uses a stand-in trainer (tests/scripts/slurm_probe.py: the real
RL flag parser, real generation through the servers, then a chosen exit code) to pick the exit code;
every other RL and eval job, colocated included, runs the real `sfpo-megatron rl` / `eval`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import requests
from launch import PYTHON, child_env, read_jsonl
from launch import run as run_command
from safetensors.torch import load_file
from slurm_support import (
    REPO,
    ROLLOUT_SERVER,
    cluster_is_up,
    describe,
    job_env,
    job_info,
    output,
    processes_with,
    sbatch,
    scancel,
    start_cluster,
    stop_cluster,
    wait_job,
)
from tiny_models import write_tiny_config

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

PROBE = f"{sys.executable} {REPO / 'tests/scripts/slurm_probe.py'}"
CPU_NODES = ["-N", "2", "--gpus-per-node=1"]


@pytest.fixture(scope="session")
def cluster():
    started = False
    if not cluster_is_up():
        start_cluster()
        started = True
    yield
    if started:
        stop_cluster()


def _ok(info: dict, cwd: Path, name: str, job: int, run_dir: Path | None = None) -> None:
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
        f"job {job}: {info['JobState']} {info['ExitCode']}\n{describe(cwd, name, job, run_dir)}"


def _no_servers_left(marker: str) -> None:
    left = processes_with(ROLLOUT_SERVER, marker)
    for _ in range(20):  # slurmstepd reaps asynchronously
        if not left:
            break
        time.sleep(0.5)
        left = processes_with(ROLLOUT_SERVER, marker)
    assert not left, f"rollout servers survived the job: {[p.cmdline() for p in left]}"


def _port_closed(url: str) -> None:
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/health", timeout=5)


# --- pretraining job: the launcher across two nodes, checkpoints, preemption --------------------


def _iterations_logged(metrics: Path) -> list[int]:
    """Iterations in a metrics.jsonl being written (a last line without its newline is skipped)."""
    if not metrics.exists():
        return []
    text = metrics.read_text()
    return [json.loads(line)["iteration"] for line in text[:text.rfind("\n") + 1].splitlines() if line]


def _wait_for_iteration(metrics: Path, at_least: int, job: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(it >= at_least for it in _iterations_logged(metrics)):
            return
        state = job_info(job)["JobState"]
        assert state in ("PENDING", "RUNNING"), f"job {job} ended ({state}) before iteration {at_least}"
        time.sleep(0.5)
    raise AssertionError(f"no iteration {at_least} in {metrics} after {timeout}s")


@pytest.mark.parametrize("target", [
    # what --signal=B:TERM@N does before the time limit: the batch script traps it, sends
    # SIGTERM to the trainer ranks, and requeues once they have checkpointed
    pytest.param("batch", marks=pytest.mark.slow),
    # a TERM to the job steps only: the trainer checkpoints and exits 143, the script requeues
    pytest.param("steps", marks=pytest.mark.slow),
])
def test_sigterm_checkpoints_requeues_and_resumes(cluster, tmp_path: Path, target: str) -> None:
    model = write_tiny_config(tmp_path / "model")
    run = tmp_path / "run"
    iters = 300
    job = sbatch("pretrain.sbatch", ["--model-config", str(model), "--mock-data", "--train-iters",
                                     str(iters), "--seq-length", "32", "--global-batch-size", "2"],
                 tmp_path, job_env(RUN_DIR=run, SAVE_INTERVAL=100000), CPU_NODES)
    _wait_for_iteration(run / "metrics/metrics.jsonl", 3, job, 400)
    scancel("--signal=TERM", *(["--batch"] if target == "batch" else []), str(job))
    info = wait_job(job, 600)
    _ok(info, tmp_path, "sfpo-pretrain", job, run)
    out = output(tmp_path, "sfpo-pretrain", job)
    assert "on 2 node(s): n1 n2" in out and "tasks per node: 1" in out  # DP=2, one rank per node
    assert f"checkpoints: {run}/checkpoints; metrics: {run}/metrics/metrics.jsonl" in out
    assert sorted(p.name for p in (run / f"logs/{job}_0").glob("trainer-*.log")) == \
        ["trainer-0.log", "trainer-1.log"]
    assert info["Restarts"] == "1", out
    assert "requeueing job" in out, out
    # The first attempt saved at the step where it stopped; the second resumed from exactly there.
    resumed = [line for line in out.splitlines() if "resuming from" in line]
    assert len(resumed) == 1, out
    k = int(resumed[0].rsplit("iteration ", 1)[1].rstrip(")"))
    assert 3 <= k < iters, out
    assert (run / f"checkpoints/iter_{k:07d}/sfpo_meta.json").exists()
    assert (run / "checkpoints/latest_checkpointed_iteration.txt").read_text().strip() == str(iters)
    first = (run / f"logs/{job}_0/trainer-0.log").read_text()
    assert "will checkpoint and exit" in first
    rows = read_jsonl(run / "metrics/metrics.jsonl")
    assert [r["iteration"] for r in rows] == list(range(1, iters + 1))  # no step lost or repeated
    assert rows[k]["consumed_samples"] == 2 * (k + 1)  # the data position was restored too
    assert (run / f"logs/{job}_1/trainer-0.log").exists()


# --- conversion ----------------------------------------------------------------------------------


def test_convert_script_under_srun_writes_a_checkpoint_that_loads(cluster, tmp_path: Path,
                                                                  rollout_model: Path) -> None:
    out_dir = tmp_path / "mcore"
    job = sbatch("convert_hf.sbatch", [], tmp_path,
                 job_env(HF_DIR=rollout_model, OUT_DIR=out_dir, TP=2, PP=1), CPU_NODES)
    info = wait_job(job, 600)
    _ok(info, tmp_path, "sfpo-convert", job, out_dir)
    assert "2 ranks on 2 node(s)" in output(tmp_path, "sfpo-convert", job)
    assert (out_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    # Load it (megatron reshards TP=2 -> 1) and export back: every tensor equals the original.
    back = tmp_path / "back"
    run_command([PYTHON, str(REPO / "tools/convert_mcore_to_hf.py"), "--load", str(out_dir),
                 "--hf-config", str(rollout_model), "--save", str(back)], env=child_env(), timeout=600)
    original = load_file(rollout_model / "model.safetensors")
    exported = {}
    for f in back.glob("*.safetensors"):
        exported.update(load_file(f))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and (exported[name] == tensor).all(), name


# --- RL scripts: rollout servers on their nodes, URLs to the trainer, shutdown ---------------------


def test_colocated_script_failing_trainer_stops_servers_and_is_not_requeued(
        cluster, tmp_path: Path, rollout_model: Path) -> None:
    run = tmp_path / "run"
    job = sbatch("rl_sfpo_colocated.sbatch", ["--num-rollouts", "2"], tmp_path,
                 job_env(HF_DIR=rollout_model, RUN_DIR=run, ROLLOUT_BACKEND="cpu", SFPO_TRAINER=PROBE,
                         PROBE_EXIT=3), CPU_NODES)
    info = wait_job(job, 600, release_requeued=False)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0", \
        describe(tmp_path, "sfpo-rl-colocated", job, run)
    assert info["Restarts"] == "0"
    assert "failed with exit code 3" in output(tmp_path, "sfpo-rl-colocated", job)
    reports = [json.loads((run / f"metrics/probe-{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["node"] for r in reports) == ["n1", "n2"]
    for r in reports:
        assert r["args"]["colocate"] is True
        # Both nodes serve; the emulated nodes share 127.0.0.1, so each node gets its own port.
        urls = r["args"]["rollout_urls"]
        assert len(urls) == 2 and len(set(urls)) == 2
        assert all(g["health"] == 200 and len(g["output_ids"]) == 4 for g in r["generations"])
    _no_servers_left(str(rollout_model))
    for url in reports[0]["args"]["rollout_urls"]:
        _port_closed(url)


# --- the real RL and eval jobs --------------------------------------------------------------------


def _math_prompts(tmp_path: Path) -> Path:
    """A tiny MATH-500-style file through tools/prepare_math_data.py, as users prepare theirs."""
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"problem": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
                           for a, b in [(1, 2), (3, 4), (5, 6), (7, 1)]))
    out = tmp_path / "prompts.jsonl"
    run_command([PYTHON, str(REPO / "tools/prepare_math_data.py"), "--dataset", "math500",
                 "--input", str(raw), "--output", str(out)], env=child_env(), timeout=120)
    return out


RL_FLAGS = ["--num-rollouts", "2", "--rollout-batch-size", "2", "--n-samples-per-prompt", "2",
            "--rollout-max-response-len", "8", "--no-chat-template",
            "--reward-fn", "math", "--reward-num-workers", "1", "--sfpo-inner-steps", "2",
            "--save-interval", "1"]


@pytest.mark.slow  # two Slurm nodes, a trainer and a server: ~20 s
def test_disaggregated_sfpo_job_runs_two_steps_across_both_nodes(cluster, tmp_path: Path,
                                                                 rollout_model: Path) -> None:
    run = tmp_path / "run"
    flags = ["--prompt-data", str(_math_prompts(tmp_path)), *RL_FLAGS]
    job = sbatch("rl_sfpo.sbatch", flags, tmp_path,
                 job_env(HF_DIR=rollout_model, RUN_DIR=run, ROLLOUT_BACKEND="cpu"), CPU_NODES)
    info = wait_job(job, 900)
    _ok(info, tmp_path, "sfpo-rl", job, run)
    out = output(tmp_path, "sfpo-rl", job)
    assert "trainer nodes: n1; rollout nodes: n2" in out
    assert f"checkpoints: {run}/checkpoints; metrics: {run}/metrics/metrics.jsonl" in out
    rows = read_jsonl(run / "metrics/metrics.jsonl")
    assert sorted({r["iteration"] for r in rows}) == [1, 2], rows
    assert (run / "checkpoints/latest_checkpointed_iteration.txt").read_text().strip() == "2"
    # The server ran on n2 on the port derived from the job id, and is gone.
    port = 20000 + (job % 1250) * 32 + 1
    assert f"--rollout-backend external --rollout-urls http://127.0.0.1:{port} " in out
    server_log = next((run / f"logs/{job}_0").glob("rollout-*-0.log")).read_text()
    assert f"cpu server 0 on n2 (127.0.0.1:{port})" in server_log
    assert "stopped steps: sfpo-rollout" in out
    _no_servers_left(str(rollout_model))
    _port_closed(f"http://127.0.0.1:{port}")


@pytest.mark.slow
def test_colocated_sfpo_job_trains_two_steps_on_the_servers_nodes(cluster, tmp_path: Path,
                                                                 rollout_model: Path) -> None:
    run = tmp_path / "run"
    flags = ["--prompt-data", str(_math_prompts(tmp_path)), *RL_FLAGS]
    job = sbatch("rl_sfpo_colocated.sbatch", flags, tmp_path,
                 job_env(HF_DIR=rollout_model, RUN_DIR=run, ROLLOUT_BACKEND="cpu"), CPU_NODES)
    info = wait_job(job, 900)
    _ok(info, tmp_path, "sfpo-rl-colocated", job, run)
    out = output(tmp_path, "sfpo-rl-colocated", job)
    assert f"checkpoints: {run}/checkpoints; metrics: {run}/metrics/metrics.jsonl" in out
    # One server per node, both given to the trainer, which time-shares them (--colocate).
    urls = out.split("--rollout-urls ", 1)[1].split(" --colocate", 1)[0].split()
    assert len(urls) == 2 and len(set(urls)) == 2, out
    rows = read_jsonl(run / "metrics/metrics.jsonl")
    assert sorted({r["iteration"] for r in rows}) == [1, 2], rows
    assert all(r["weight_version"] == r["iteration"] for r in rows), rows
    assert (run / "checkpoints/latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert sorted(p.name for p in (run / f"logs/{job}_0").glob("trainer-*.log")) == \
        ["trainer-0.log", "trainer-1.log"]
    _no_servers_left(str(rollout_model))
    for url in urls:
        _port_closed(url)


@pytest.mark.slow
def test_preempted_sfpo_job_requeues_and_finishes_from_its_checkpoint(cluster, tmp_path: Path,
                                                                      rollout_model: Path) -> None:
    run = tmp_path / "run"
    steps = 12
    flags = ["--prompt-data", str(_math_prompts(tmp_path)), *RL_FLAGS, "--num-rollouts", str(steps),
             "--save-interval", "1000"]
    job = sbatch("rl_sfpo.sbatch", flags, tmp_path,
                 job_env(HF_DIR=rollout_model, RUN_DIR=run, ROLLOUT_BACKEND="cpu"), CPU_NODES)
    _wait_for_iteration(run / "metrics/metrics.jsonl", 2, job, 600)
    scancel("--signal=TERM", "--batch", str(job))
    info = wait_job(job, 900)
    _ok(info, tmp_path, "sfpo-rl", job, run)
    out = output(tmp_path, "sfpo-rl", job)
    assert info["Restarts"] == "1" and "requeueing job" in out, out
    resumed = [line for line in out.splitlines() if "resuming from" in line]
    assert len(resumed) == 1, out
    k = int(resumed[0].rsplit("iteration ", 1)[1].rstrip(")"))
    assert 2 <= k < steps
    rows = read_jsonl(run / "metrics/metrics.jsonl")
    assert [r["iteration"] for r in rows] == list(range(1, steps + 1))
    assert (run / "checkpoints/latest_checkpointed_iteration.txt").read_text().strip() == str(steps)
    _no_servers_left(str(rollout_model))


@pytest.mark.slow
def test_eval_script_scores_a_checkpoint_through_the_servers(cluster, tmp_path: Path,
                                                             rollout_model: Path) -> None:
    ckpt = tmp_path / "mcore"
    run_command([PYTHON, str(REPO / "tools/convert_hf_to_mcore.py"), "--hf-dir", str(rollout_model),
                 "--save", str(ckpt)], env=child_env(), timeout=600)
    run_dir = tmp_path / "eval"
    data = _math_prompts(tmp_path)
    job = sbatch("eval.sbatch", ["--eval-prompt-data", f"math500={data}", "aime24=" + str(data),
                                 "--n-samples-per-eval-prompt", "4", "--eval-max-response-len", "8",
                                 "--no-chat-template", "--reward-num-workers", "1"],
                 tmp_path, job_env(HF_DIR=rollout_model, CKPT=ckpt, RUN_DIR=run_dir, ROLLOUT_BACKEND="cpu"),
                 CPU_NODES)
    info = wait_job(job, 600)
    _ok(info, tmp_path, "sfpo-eval", job, run_dir)
    text = (run_dir / f"logs/{job}_0/eval-0.log").read_text()
    for name in ("math500", "aime24"):
        assert f"eval/{name}/avg@4" in text, text[-3000:]
    _no_servers_left(str(rollout_model))
