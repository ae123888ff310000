"""RolloutClient over two real CPU servers (started by the launcher): dispatch, concurrency, refit
(disk, and gloo broadcast from a separate trainer-like process), and servers dying mid-batch.

GPU validation: the same module runs against real SGLang engines with
``SFPO_ROLLOUT_BACKEND=sglang SFPO_ROLLOUT_ARGS="--dtype float32 --disable-cuda-graph"``
(the broadcaster then uses NCCL)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from hf_reference import (
    hf_greedy,
    hf_greedy_same_length,
    hf_log_softmax,
    load_hf,
    make_prompts,
    model_with_state,
    perturbed_state,
)
from launch import REPO, SERVER_ENV
from tiny_models import ROLLOUT_VOCAB

from sfpo_megatron.rollout.client import NoLiveServerError, RolloutClient
from sfpo_megatron.rollout.transport import DiskTransport


@pytest.fixture(scope="module")
def rollout_server_options() -> dict[str, Any]:
    return {"backend": os.environ.get("SFPO_ROLLOUT_BACKEND", "cpu"), "num_engines": 2, "health_timeout_s": 600,
            "extra_args": shlex.split(os.environ.get("SFPO_ROLLOUT_ARGS", ""))}


@pytest.fixture(scope="module")
def hf(rollout_model: Path) -> torch.nn.Module:
    return load_hf(rollout_model)


@pytest.fixture(scope="module")
def client(rollout_server: Any) -> RolloutClient:
    return RolloutClient(rollout_server.urls, max_concurrency=64, timeout=60, retries=1, backoff_s=0.05)


def full_distributions(url: str, prompt: list[int]) -> torch.Tensor:
    """The server's log-softmax over the whole vocabulary at every prompt position after the first."""
    r = requests.post(url + "/generate", json={"input_ids": prompt, "sampling_params": {"max_new_tokens": 0},
                                               "return_logprob": True, "logprob_start_len": 0,
                                               "top_logprobs_num": ROLLOUT_VOCAB},
                      timeout=60)
    assert r.status_code == 200, r.text
    rows = r.json()["meta_info"]["input_top_logprobs"][1:]
    out = torch.full((len(rows), ROLLOUT_VOCAB), float("nan"))
    for k, row in enumerate(rows):
        for v, i, _ in row:
            out[k, i] = v
    return out


def assert_servers_match(urls: list[str], model: torch.nn.Module, prompt: list[int]) -> None:
    ref = hf_log_softmax(model, prompt)[:-1]
    for url in urls:
        assert (full_distributions(url, prompt) - ref).abs().max().item() < 1e-4, url


def test_dispatch_spreads_samples_and_matches_transformers(client: RolloutClient, hf: torch.nn.Module) -> None:
    prompts = make_prompts(8, seed=10)
    results = client.generate(prompts, {"temperature": 0, "max_new_tokens": 12}, n=2)
    assert len({s.server for row in results for s in row}) == 2  # least-loaded dispatch used both
    for prompt, row in zip(prompts, results):
        ref = hf_greedy(hf, prompt, 12)
        for j, s in enumerate(row):
            assert (s.prompt_index, s.sample_index, s.output_ids, s.weight_version) == (prompts.index(prompt), j, ref, "default")
            assert len(s.output_logprobs) == len(ref) and s.attempts == 1 and s.finish_reason["type"] in ("stop", "length")


def test_64_concurrent_requests_complete(client: RolloutClient, hf: torch.nn.Module) -> None:
    prompts = make_prompts(64, length=6, seed=11)
    refs = hf_greedy_same_length(hf, prompts, 10)
    results = client.generate(prompts, {"temperature": 0, "max_new_tokens": 10})
    assert [row[0].output_ids for row in results] == refs
    seeded = client.generate(prompts[:4], {"temperature": 1.0, "max_new_tokens": 6}, n=2, seed=100)
    again = client.generate(prompts[:4], {"temperature": 1.0, "max_new_tokens": 6}, n=2, seed=100)
    assert [[s.output_ids for s in r] for r in seeded] == [[s.output_ids for s in r] for r in again]


def test_admin_wrappers_reach_every_server(client: RolloutClient, rollout_model: Path) -> None:
    assert client.health() == {u: True for u in client.live_urls()}
    assert client.health_generate() == {u: True for u in client.live_urls()}
    assert {i["model_path"] for i in client.get_model_info().values()} == {str(rollout_model)}
    assert all(r["success"] for r in client.flush_cache().values())
    assert all(r["status"] == "ok" for r in client.pause_generation("in_place").values())
    assert all(r["status"] == "ok" for r in client.continue_generation().values())
    assert all(r["success"] for r in client.release_memory_occupation(["weights"]).values())
    assert all(r["success"] for r in client.resume_memory_occupation(["weights"]).values())


def test_refit_from_disk_changes_the_servers_logits(client: RolloutClient, rollout_model: Path, hf: torch.nn.Module,
                                                    tmp_path: Path) -> None:
    state = perturbed_state(rollout_model, seed=21)
    new_model = model_with_state(rollout_model, state)
    prompt = make_prompts(1, length=10, seed=12)[0]
    old_ref = hf_log_softmax(hf, prompt)[:-1]
    assert (hf_log_softmax(new_model, prompt)[:-1] - old_ref).abs().max().item() > 1e-2  # the update is visible
    with DiskTransport(client, tmp_path / "refit", bucket_bytes=64 * 1024) as dt:
        stats = dt.push(state.items(), "disk-1")
    assert stats.num_buckets > 1 and stats.num_tensors == len(state)
    assert client.get_weight_version() == {u: "disk-1" for u in client.live_urls()}
    assert_servers_match(client.live_urls(), new_model, prompt)
    sample = client.generate([prompt], {"temperature": 0, "max_new_tokens": 8})[0][0]
    assert sample.weight_version == "disk-1" and sample.output_ids == hf_greedy(new_model, prompt, 8)


BROADCASTER = textwrap.dedent("""
    # A trainer stand-in: plain python (no transformers), rank 0 of the weight-update group, transport.py.
    import json, sys
    from safetensors.torch import load_file
    from sfpo_megatron.rollout.client import RolloutClient
    from sfpo_megatron.rollout.transport import DistributedTransport

    weights, urls, out = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
    state = load_file(weights)
    client = RolloutClient(urls, timeout=120)
    with DistributedTransport(client, bucket_bytes=48 * 1024, group_name="refit_test") as t:
        first = t.push(state.items(), "dist-1")
        second = t.push(state.items(), "dist-2")  # the same group serves later pushes
    json.dump({"buckets": first.num_buckets, "tensors": first.num_tensors, "bytes": second.bytes}, open(out, "w"))
""")


def test_refit_through_gloo_broadcast_from_a_trainer_process(client: RolloutClient, rollout_model: Path,
                                                             tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = perturbed_state(rollout_model, seed=33)
    save_file(state, str(tmp_path / "update.safetensors"))
    script = tmp_path / "broadcaster.py"
    script.write_text(BROADCASTER)
    out = tmp_path / "stats.json"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "update.safetensors"), ",".join(client.live_urls()), str(out)],
        env={**os.environ, **SERVER_ENV}, capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(out.read_text())
    assert stats["buckets"] > 1 and stats["tensors"] == len(state)
    assert stats["bytes"] == sum(t.numel() * t.element_size() for t in state.values())
    assert client.get_weight_version() == {u: "dist-2" for u in client.live_urls()}
    prompt = make_prompts(1, length=9, seed=13)[0]
    assert_servers_match(client.live_urls(), model_with_state(rollout_model, state), prompt)


def test_killing_servers_mid_batch(rollout_server: Any) -> None:
    """Runs last: it kills the module's servers. One dies mid-batch -> the batch completes on the
    other; both dead -> NoLiveServerError quickly."""
    client = RolloutClient(rollout_server.urls, max_concurrency=24, timeout=60, retries=1, backoff_s=0.05)
    victim, survivor = rollout_server.urls
    prompts = make_prompts(24, length=6, seed=14)
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["results"] = client.generate(prompts, {"temperature": 0, "max_new_tokens": 120, "ignore_eos": True})
        except Exception as e:  # surfaced by the assertions below
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 60
    def busy() -> bool:  # SGLang reports num_reqs only; the CPU server also says what is running
        load = requests.get(victim + "/get_load", timeout=5).json()[0]
        return load.get("num_running_reqs", load.get("num_reqs", 0)) > 0

    while not busy():
        assert time.monotonic() < deadline, "the victim never started a batch"
        time.sleep(0.01)
    os.killpg(rollout_server.processes[0].pid, signal.SIGKILL)  # SGLang forks workers
    t.join(timeout=120)
    assert "error" not in box, box.get("error")
    results = [row[0] for row in box["results"]]
    assert all(len(s.output_ids) == 120 and s.finish_reason == {"type": "length", "length": 120} for s in results)
    retried = [s for s in results if s.attempts > 1]
    assert retried and all(s.server == survivor for s in retried)
    assert client.live_urls() == [survivor]
    # Every sample, retried or not, equals the survivor's greedy answer (both servers held the same weights).
    ref = requests.post(survivor + "/generate", json={"input_ids": prompts, "sampling_params": {
        "temperature": 0, "max_new_tokens": 120, "ignore_eos": True}}, timeout=60).json()
    assert [s.output_ids for s in results] == [r["output_ids"] for r in ref]

    os.killpg(rollout_server.processes[1].pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(NoLiveServerError, match="no live rollout server left"):
        client.generate(prompts[:4], {"temperature": 0, "max_new_tokens": 4})
    assert time.monotonic() - start < 30
    assert client.live_urls() == []
