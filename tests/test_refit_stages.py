"""A refit pushed by several trainer stages at once, each through its own weight-update group, to
a real CPU rollout server process (127.0.0.1).

Quick cases (this process plays two stages, one thread each):

* the stages' flat buckets are staged, not applied: until the commit the server generates with
  and reports its old weights and version; the commit applies every tensor at once, and the
  server then holds exactly the pushed tensors;
* a stage whose broadcast breaks voids the whole update: the other stage's staged tensors are
  dropped, the server keeps its previous weights and version;
* the engine's receive buffers: never a live parameter, and from the third update on the ones
  that the previous commit replaced (no fresh memory to fault in), each commit exact.

Slow cases (real torchrun trainers, tests/scripts/stage_refit_worker.py): PP=2, TP=2 and
PP=2 x TP=2 refits leave the server with exactly the PP=1 refit's weights, greedy tokens and
logprobs, each stage having pushed only its own tensors; a server frozen in the middle of a PP=2
refit fails the refit on every trainer rank within the refit timeout, naming the stage and the
server, and keeps its previous version and weights.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
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

from sfpo_megatron.cpu_server.engine import GenerationEngine
from sfpo_megatron.rollout.client import RolloutClient
from sfpo_megatron.rollout.transport import DistributedTransport

PROMPTS = [[5, 17, 42, 99, 3], [250, 7, 7, 130], [64, 65, 66, 67, 68]]


@pytest.fixture(scope="module")
def rollout_server_options() -> dict[str, Any]:
    return {"extra_args": ["--weight-update-timeout", "5"], "health_timeout_s": 180}


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
    # --weight-update-timeout (5 s) and drops everything staged for the update.
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


def test_receive_buffers_are_recycled_and_never_live(rollout_model: Path) -> None:
    model = load_hf(rollout_model)
    engine = GenerationEngine(model, eos_token_ids=set())
    names = sorted(load_file(str(rollout_model / "model.safetensors")))
    params = model.state_dict(keep_vars=True)
    received: list[set[int]] = []
    for update in range(4):
        state = perturbed_state(rollout_model, seed=20 + update, scale=0.3)
        live = {p.data_ptr() for p in model.parameters()}
        buffers = {n: engine._host_buffer(list(state[n].shape), state[n].dtype) for n in names}
        assert not live & {b.data_ptr() for b in buffers.values()}
        for n, b in buffers.items():
            b.copy_(state[n])
        engine.stage("g", buffers)
        assert engine.apply_staged() == len(names)
        assert all(torch.equal(params[n], state[n]) for n in names)
        received.append({b.data_ptr() for b in buffers.values()})
    assert received[2] == received[0] and received[3] == received[1] and not received[0] & received[1]


# ------------------------------------------------------------------------------------------------
# Real trainers (torchrun)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def new_model(rollout_model: Path) -> Path:
    return save_rollout_model(rollout_model.parent / "new_model", seed=5)


def run_worker(mode: str, nproc: int, rollout_server: Any, rollout_model: Path, new_model: Path) -> Path:
    out = rollout_model.parent / f"out_{mode}"
    (out / "disk").mkdir(parents=True, exist_ok=True)
    torchrun(nproc, [str(SCRIPTS / "stage_refit_worker.py"), mode, rollout_server.urls[0],
                     str(rollout_server.processes[0].pid), str(rollout_model), str(new_model), str(out)],
             timeout=600, env=child_env(TOKENIZERS_PARALLELISM="false"))
    return out


@pytest.fixture(scope="module")
def layouts(rollout_server: Any, rollout_model: Path, new_model: Path) -> tuple[dict, Path]:
    out = run_worker("layouts", 4, rollout_server, rollout_model, new_model)
    return json.loads((out / "layouts.json").read_text()), out


def expected_stage_names(names: list[str], pp: int) -> list[set[str]]:
    """HF tensors by the pipeline stage that holds them (2 layers: one per stage at PP=2)."""
    if pp == 1:
        return [set(names)]
    first = {n for n in names if n.startswith("model.embed_tokens.") or n.startswith("model.layers.0.")}
    return [first, set(names) - first]


@pytest.mark.slow  # four torchrun ranks, five refits: about 1-2 min on 2 busy cores
@pytest.mark.parametrize("layout", ["pp2", "tp2", "pp2tp2", "pp2tp2_disk"])
def test_every_layout_leaves_the_server_with_the_pp1_weights(layouts: tuple[dict, Path], layout: str,
                                                             new_model: Path) -> None:
    results, out = layouts
    new = load_file(str(new_model / "model.safetensors"))
    reference, mine = torch.load(out / "pp1.pt"), torch.load(out / f"{layout}.pt")
    assert sorted(mine) == sorted(new)
    assert all(torch.equal(mine[n], new[n]) and torch.equal(mine[n], reference[n]) for n in new)
    pp1, entry = results["pp1"], results[layout]
    assert entry["greedy"] == pp1["greedy"] == [hf_greedy(load_hf(new_model), p, 6) for p in PROMPTS]
    assert entry["logprobs"] == pp1["logprobs"]
    assert entry["weight_version"] == str(list(results).index(layout) + 1) and entry["staged"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("layout,pp,leaders", [("pp1", 1, [0]), ("pp2", 2, [0, 2]), ("tp2", 1, [0]),
                                               ("pp2tp2", 2, [0, 2]), ("pp2tp2_disk", 2, [0, 2])])
def test_each_stage_pushes_only_its_own_tensors(layouts: tuple[dict, Path], new_model: Path, layout: str,
                                                pp: int, leaders: list[int]) -> None:
    entry = layouts[0][layout]
    names = list(load_file(str(new_model / "model.safetensors")))
    assert [s["stage"] for s in entry["stages"]] == list(range(pp))
    assert [s["rank"] for s in entry["stages"]] == leaders  # megatron's order: TP fastest, then DP, then PP
    assert [set(s["names"]) for s in entry["stages"]] == expected_stage_names(names, pp)
    assert sum(len(s["names"]) for s in entry["stages"]) == len(names)  # nothing twice
    m = entry["metrics"]
    assert m["refit/num_stages"] == pp and m["refit/slowest_stage"] in range(pp)
    assert all(m[f"refit/stage{i}_gb_per_s"] > 0 for i in range(pp))


@pytest.mark.slow  # two torchrun ranks, waits out a 3 s refit timeout and the server's 5 s
def test_a_server_frozen_mid_refit_fails_every_rank_and_keeps_its_version(
        rollout_server: Any, rollout_model: Path, new_model: Path) -> None:
    out = run_worker("freeze", 2, rollout_server, rollout_model, new_model)
    result = json.loads((out / "freeze.json").read_text())
    url = rollout_server.urls[0]
    assert result["frozen_after_staged"] and result["frozen_after_staged"][0] > 0  # frozen mid-update
    for r in result["ranks"]:
        assert r["error"] is not None and r["elapsed"] < 3.0 + 10, result
        # The stages still pushing when it froze name it (one may have finished its part before).
        assert re.match(r"refit to weight_version 2 failed: stage [01] \(global rank [01]\): RefitError: no live "
                        r"rollout server left for the refit to weight_version 2: " + re.escape(url), r["error"]), r
    assert len({r["error"] for r in result["ranks"]}) == 1  # one verdict, on every rank
    # Nothing of version 2 was applied: version 1 and its weights, exactly.
    assert result["server"]["weight_version"] == "1" and result["server"]["staged"] == 0
    new = load_file(str(new_model / "model.safetensors"))
    held = torch.load(out / "freeze.pt")
    assert all(torch.equal(held[n], new[n]) for n in new)
