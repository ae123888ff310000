"""A refit pushed by several trainer stages at once, each through its own weight-update group, to
a real CPU rollout server process (127.0.0.1).

Quick cases (this process plays two stages, one thread each):

* the stages' flat buckets are staged, not applied: until the commit the server generates with
  and reports its old weights and version; the commit applies every tensor at once, and the
  server then holds exactly the pushed tensors;
* a stage whose broadcast breaks voids the whole update: the other stage's staged tensors are
  dropped, the server keeps its previous weights and version.

Slow cases (real torchrun trainers, tests/scripts/stage_refit_worker.py): PP=2, TP=2 and
PP=2 x TP=2 refits leave the server with exactly the PP=1 refit's weights, greedy tokens and
logprobs, each stage having pushed only its own tensors; a server frozen in the middle of a PP=2
refit fails the refit on every trainer rank within the refit timeout, naming the stage and the
server, and keeps its previous version and weights.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from hf_reference import hf_greedy, load_hf, model_with_state, perturbed_state
from launch import SCRIPTS, child_env, torchrun
from safetensors.torch import load_file
from tiny_models import save_rollout_model

from sfpo_megatron.rollout.client import RolloutClient
from sfpo_megatron.rollout.transport import DistributedTransport

PROMPTS = [[5, 17, 42, 99, 3], [250, 7, 7, 130], [64, 65, 66, 67, 68]]


@pytest.fixture(scope="module")
def rollout_server_options() -> dict[str, Any]:
    return {"extra_args": ["--weight-update-timeout", "2"], "health_timeout_s": 180}


def served(url: str, names: list[str], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    out = {}
    for n in names:
        r = requests.post(url + "/get_weights_by_name", json={"name": n, "truncate_size": shapes[n].numel()},
                          timeout=30)
        out[n] = torch.tensor(r.json(), dtype=torch.float32).reshape(shapes[n])
    return out


def info(url: str) -> dict:
    i = requests.get(url + "/get_server_info", timeout=10).json()
    return {"weight_version": i["weight_version"], "staged": i["internal_states"][0]["staged_tensors"]}


def greedy(url: str) -> list[list[int]]:
    out = requests.post(url + "/generate", json={"input_ids": PROMPTS, "sampling_params": {
        "temperature": 0, "max_new_tokens": 6, "ignore_eos": True}}, timeout=60).json()
    return [o["output_ids"] for o in out]


def two_stages(url: str) -> tuple[RolloutClient, DistributedTransport, DistributedTransport]:
    client = RolloutClient([url], timeout=60)
    # Small buckets: each stage sends several flat buffers.
    stages = [DistributedTransport(client, bucket_bytes=16 * 1024, group_name=f"g_stage{i}", timeout_s=20)
              for i in range(2)]
    for s in stages:
        s.connect()
    return client, *stages


def test_stages_are_staged_until_the_commit_then_land_together(rollout_server: Any, rollout_model: Path) -> None:
    url = rollout_server.urls[0]
    old = load_file(str(rollout_model / "model.safetensors"))
    new = perturbed_state(rollout_model, seed=11, scale=0.3)
    names = sorted(old)
    shapes = {n: old[n].shape for n in names}
    before = greedy(url)
    assert before == [hf_greedy(load_hf(rollout_model), p, 6) for p in PROMPTS]
    client, s0, s1 = two_stages(url)
    halves = [[(n, new[n]) for n in names[: len(names) // 2]], [(n, new[n]) for n in names[len(names) // 2:]]]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        stats = [f.result() for f in [pool.submit(s.push_part, iter(h), "7") for s, h in zip((s0, s1), halves)]]
    assert [s.num_tensors for s in stats] == [len(h) for h in halves] and all(s.num_buckets > 1 for s in stats)
    # Staged, not applied: old weights, old version, old greedy tokens.
    assert info(url) == {"weight_version": "default", "staged": len(names)}
    assert all(torch.equal(t, old[n]) for n, t in served(url, names, shapes).items())
    assert greedy(url) == before
    s0.commit("7")
    assert info(url) == {"weight_version": "7", "staged": 0}
    assert all(torch.equal(t, new[n]) for n, t in served(url, names, shapes).items())
    reference = model_with_state(rollout_model, new)
    assert greedy(url) == [hf_greedy(reference, p, 6) for p in PROMPTS] != before
    s0.close(), s1.close()
    client.close()


def test_a_broken_stage_voids_the_whole_update(rollout_server: Any, rollout_model: Path) -> None:
    url = rollout_server.urls[0]
    names = sorted(load_file(str(rollout_model / "model.safetensors")))
    shapes = {n: t.shape for n, t in load_file(str(rollout_model / "model.safetensors")).items()}
    current, version = served(url, names, shapes), info(url)["weight_version"]
    client, s0, s1 = two_stages(url)
    s0.push_part(iter([(n, current[n] + 1.0) for n in names[:5]]), "8")
    assert info(url)["staged"] == 5
    # Stage 1 announces a bucket and dies before sending it: the server gives up after its
    # --weight-update-timeout (2 s) and drops everything staged for the update.
    start = time.monotonic()
    r = requests.post(url + "/update_weights_from_distributed", timeout=60, json={
        "names": [names[-1]], "dtypes": ["float32"], "shapes": [list(shapes[names[-1]])],
        "group_name": s1.group_name, "flush_cache": False, "load_format": "flattened_bucket"})
    assert r.status_code == 400 and r.json()["message"].startswith("Failed to update parameter online")
    assert time.monotonic() - start < 15
    assert info(url) == {"weight_version": version, "staged": 0}
    s0.commit("8")  # a commit after the failure has nothing left to apply
    assert all(torch.equal(t, current[n]) for n, t in served(url, names, shapes).items())
    s0.close(), s1.close()
    client.close()
