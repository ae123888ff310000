"""The CPU rollout server (a real process on 127.0.0.1) under poisonous and oversized requests:
a request whose parameters break sampling fails alone, amplification and queue floods are
refused, and every failure is a JSON answer naming the problem."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from hf_reference import hf_greedy, load_hf, make_prompts
from tiny_models import EOS, ROLLOUT_VOCAB

from sfpo_megatron.cpu_server.server import parse_args
from sfpo_megatron.rollout.client import RolloutClient, RolloutError

PER_REQUEST = 32
QUEUED = 64


@pytest.fixture(scope="module")
def rollout_server_options() -> dict[str, Any]:
    return {"extra_args": ["--max-batch-size", "16", "--max-sequences-per-request", str(PER_REQUEST),
                           "--max-queued-sequences", str(QUEUED)], "health_timeout_s": 180}


@pytest.fixture(scope="module")
def url(rollout_server: Any) -> str:
    return rollout_server.urls[0]


@pytest.fixture(scope="module")
def hf(rollout_model: Path) -> torch.nn.Module:
    return load_hf(rollout_model)


def post(url: str, path: str, body: Any = None, raw: bytes | None = None, timeout: float = 60) -> requests.Response:
    if raw is not None:
        return requests.post(url + path, data=raw, headers={"Content-Type": "application/json"}, timeout=timeout)
    return requests.post(url + path, json=body, timeout=timeout)


def load(url: str) -> dict:
    return requests.get(url + "/get_load", timeout=10).json()[0]


def wait_for(cond: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


# Valid requests that race the poison: greedy and seeded sampling (with and without filters and
# logprobs); "long" keeps a batch running while the poison arrives.
PROMPTS = make_prompts(6, seed=31)
VALID: dict[str, dict] = {
    "long": {"input_ids": PROMPTS[0], "sampling_params": {"temperature": 0, "max_new_tokens": 480, "ignore_eos": True}},
    "greedy_a": {"input_ids": PROMPTS[1], "sampling_params": {"temperature": 0, "max_new_tokens": 24}},
    "greedy_b": {"input_ids": PROMPTS[2], "sampling_params": {"temperature": 0, "max_new_tokens": 24}},
    "seeded": {"input_ids": PROMPTS[3], "return_logprob": True,
               "sampling_params": {"temperature": 1.0, "max_new_tokens": 40, "sampling_seed": 5, "ignore_eos": True}},
    "seeded_filtered": {"input_ids": PROMPTS[4], "sampling_params": {
        "temperature": 0.7, "top_p": 0.9, "top_k": 40, "max_new_tokens": 40, "sampling_seed": 9, "ignore_eos": True}},
    "seeded_n": {"input_ids": PROMPTS[5], "sampling_params": {
        "temperature": 1.0, "max_new_tokens": 30, "sampling_seed": 3, "n": 3, "ignore_eos": True}},
}


def outputs(answer: Any) -> Any:
    """What must not change: the tokens and the reported logprobs."""
    items = answer if isinstance(answer, list) else [answer]
    return [(a["output_ids"], a["meta_info"].get("output_token_logprobs")) for a in items]


def assert_same_outputs(got: Any, ref: Any, key: str) -> None:
    """Same tokens; logprobs equal up to the float rounding of batched matmuls (the batch differs)."""
    assert [ids for ids, _ in got] == [ids for ids, _ in ref], key
    for (_, lps), (_, ref_lps) in zip(got, ref):
        assert (lps is None) == (ref_lps is None), key
        if lps is not None:
            assert [t for _, t, _ in lps] == [t for _, t, _ in ref_lps], key
            diff = torch.tensor([v for v, _, _ in lps]) - torch.tensor([v for v, _, _ in ref_lps])
            assert diff.abs().max().item() < 1e-4, key


@pytest.fixture(scope="module")
def alone(url: str) -> dict[str, Any]:
    """Each valid request's outputs when it runs alone on the server."""
    out = {}
    for key, body in VALID.items():
        r = post(url, "/generate", body)
        assert r.status_code == 200, r.text
        out[key] = outputs(r.json())
    return out


ALL_STOPS_BUT_EOS = [t for t in range(ROLLOUT_VOCAB) if t != EOS]
# (body, status, param, message): refused up front, or at sampling time inside a running batch.
POISONS = {
    "bias_1e308": ({"logit_bias": {"5": 1e308}}, "sampling_params.logit_bias[5]",
                   "sampling_params.logit_bias[5]: must be a finite float32 value (at most 3.403e+38 in magnitude), got 1e+308"),
    "bias_minus_1e308_everywhere": ({"logit_bias": {str(t): -1e308 for t in range(ROLLOUT_VOCAB)}},
                                    "sampling_params.logit_bias[0]",
                                    "sampling_params.logit_bias[0]: must be a finite float32 value (at most 3.403e+38 "
                                    "in magnitude), got -1e+308"),
    "bias_twice_on_a_token": ({"logit_bias": {"5": 3e38, "05": 3e38}}, "sampling_params.logit_bias",
                              "sampling_params.logit_bias: token id 5 appears twice"),
    "all_stop_ids_min_new_tokens": ({"min_new_tokens": 2, "stop_token_ids": list(range(ROLLOUT_VOCAB))},
                                    "sampling_params.min_new_tokens",
                                    "sampling_params.min_new_tokens: every token is in stop_token_ids, so none can be "
                                    "sampled before min_new_tokens=2"),
    # Valid on paper; nothing is left to sample once the engine applies them.
    "stops_and_eos_min_new_tokens": ({"min_new_tokens": 3, "stop_token_ids": ALL_STOPS_BUT_EOS},
                                     "sampling_params.min_new_tokens",
                                     "sampling_params.min_new_tokens: every token still possible is a stop token (EOS "
                                     "or stop_token_ids), so none can be sampled before min_new_tokens=3"),
    "bias_overflows_after_temperature": ({"logit_bias": {"7": 3e38}, "temperature": 0.01}, "sampling_params.logit_bias",
                                         "sampling_params.logit_bias: the biased logits divided by temperature 0.01 "
                                         "overflow float32; no token can be sampled"),
    "minus_3e38_everywhere_n4": ({"logit_bias": {str(t): -3e38 for t in range(ROLLOUT_VOCAB)}, "temperature": 0.5,
                                        "n": 4}, "sampling_params.logit_bias",
                                       "sampling_params.logit_bias: the biased logits divided by temperature 0.5 "
                                       "overflow float32; no token can be sampled"),
}


@pytest.mark.parametrize("name", list(POISONS))
def test_a_poisonous_request_fails_alone(url: str, alone: dict[str, Any], name: str) -> None:
    params, param, message = POISONS[name]
    poison = {"input_ids": make_prompts(1, seed=77)[0], "sampling_params": {"max_new_tokens": 8, **params}}
    answers: dict[str, tuple[float, requests.Response]] = {}

    def send(key: str, body: dict) -> None:
        r = post(url, "/generate", body)
        answers[key] = (time.monotonic(), r)

    threads = [threading.Thread(target=send, args=(k, b)) for k, b in VALID.items()]
    for t in threads:
        t.start()
    wait_for(lambda: load(url)["num_running_reqs"] > 0, "the valid requests to start decoding")
    poisons = [threading.Thread(target=send, args=(f"poison{i}", poison)) for i in range(3)]
    for t in poisons:  # several copies, so some land in the running batch, some wait with the valid ones
        t.start()
    for t in poisons + threads:
        t.join(timeout=120)
    for i in range(3):
        done_at, r = answers[f"poison{i}"]
        assert r.status_code == 400, r.text
        assert r.json() == {"object": "error", "message": message, "type": "BadRequest", "param": param, "code": 400}
        assert done_at < answers["long"][0], "the poison was not answered while the valid batch was running"
    for key in VALID:
        r = answers[key][1]
        assert r.status_code == 200, (key, r.text)
        assert_same_outputs(outputs(r.json()), alone[key], key)
    # The poison's sibling samples (n=4) leave the engine too (its bookkeeping trails the answers).
    wait_for(lambda: load(url)["num_reqs"] == 0, "the engine to empty", timeout=10)


def test_valid_outputs_equal_transformers(alone: dict[str, Any], hf: torch.nn.Module) -> None:
    """The reference the race compares against is itself right: greedy equals HF generate."""
    for key in ("greedy_a", "greedy_b"):
        body = VALID[key]
        assert alone[key] == [(hf_greedy(hf, body["input_ids"], body["sampling_params"]["max_new_tokens"]), None)]


def test_a_poisonous_stream_ends_with_an_error_event(url: str) -> None:
    params, _, message = POISONS["stops_and_eos_min_new_tokens"]
    r = post(url, "/generate", {"input_ids": [3, 4, 5], "stream": True, "sampling_params": {"max_new_tokens": 8, **params}})
    assert r.status_code == 200
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events == [json.dumps({"error": {"message": message, "code": 400}}), "[DONE]"]


def test_amplification_is_refused(url: str) -> None:
    # 570 bytes asking for 102,400 sequences.
    body = json.dumps({"input_ids": [[1, 2]] * 100, "sampling_params": {"n": 1024, "max_new_tokens": 64}}).encode()
    r = post(url, "/generate", raw=body)
    assert r.status_code == 400
    assert r.json()["message"] == (f"sampling_params.n: the request asks for 102400 sequences (100 prompts x n=1024), "
                                   f"over this server's --max-sequences-per-request limit of {PER_REQUEST}")
    r = post(url, "/generate", {"input_ids": [[1, 2]] * (PER_REQUEST + 1), "sampling_params": {"max_new_tokens": 1}})
    assert r.status_code == 400 and r.json()["param"] == "input_ids"
    assert r.json()["message"] == (f"input_ids: the request asks for {PER_REQUEST + 1} sequences ({PER_REQUEST + 1} "
                                   f"prompts x n=1), over this server's --max-sequences-per-request limit of {PER_REQUEST}")
    assert load(url)["num_reqs"] == 0


def test_full_queue_answers_429_and_the_client_waits(url: str, hf: torch.nn.Module) -> None:
    # Paused in place, the engine admits nothing: the blockers fill the queue and keep it full.
    assert post(url, "/pause_generation", {"mode": "in_place"}).status_code == 200
    blockers = [threading.Thread(target=post, args=(url, "/generate", {
        "input_ids": [[1, 2, 3]] * PER_REQUEST, "rid": [f"block{k}_{i}" for i in range(PER_REQUEST)],
        "sampling_params": {"max_new_tokens": 8}})) for k in range(QUEUED // PER_REQUEST)]
    for t in blockers:
        t.start()
    wait_for(lambda: load(url)["num_reqs"] == QUEUED, "the blockers to fill the queue")
    r = post(url, "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}})
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert r.json() == {"object": "error", "type": "TooManyRequests", "param": None, "code": 429, "message": (
        f"the server's queue is full: {QUEUED} sequences are queued or running, this request adds 1, and "
        f"--max-queued-sequences is {QUEUED}; retry later")}
    # The trainer's client backs off and retries instead of dropping the server; it gives up only
    # after its timeout of 429s.
    impatient = RolloutClient([url], timeout=0.5, retries=0, backoff_s=0.05)
    with pytest.raises(RolloutError, match=rf"^{url}/generate answered 429 \(queue full\) for \d+ s: .*queue is full"):
        impatient.generate([[1, 2]], {"max_new_tokens": 1})
    assert impatient.live_urls() == [url]
    client = RolloutClient([url], timeout=60, retries=0, backoff_s=0.05)
    prompts = make_prompts(3, seed=41)
    box: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: box.update(out=client.generate(prompts, {"temperature": 0, "max_new_tokens": 12})))
    worker.start()
    time.sleep(1.0)
    assert "out" not in box and worker.is_alive()
    assert post(url, "/abort_request", {"rid": "block"}).status_code == 200  # prefix: the blockers only
    assert post(url, "/continue_generation", {}).status_code == 200
    worker.join(timeout=60)
    for t in blockers:
        t.join(timeout=60)
    assert [[s.output_ids for s in group] for group in box["out"]] == [[hf_greedy(hf, p, 12)] for p in prompts]
    assert client.live_urls() == [url]


def test_deeply_nested_json_gets_400(url: str) -> None:
    for raw in (b"[" * 50_000 + b"]" * 50_000,
                b'{"input_ids": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}"):
        r = post(url, "/generate", raw=raw)
        assert r.status_code == 400
        assert r.json()["message"] == "body: JSON nested deeper than 32 levels"
    r = post(url, "/update_weights_from_disk", raw=b'{"model_path": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")
    assert r.status_code == 400 and r.json()["message"] == "body: JSON nested deeper than 32 levels"


def test_truncated_safetensors_is_refused_and_the_weights_stay(url: str, rollout_model: Path, hf: torch.nn.Module,
                                                               tmp_path: Path) -> None:
    name = "model.layers.0.self_attn.q_proj.weight"
    before = post(url, "/get_weights_by_name", {"name": name, "truncate_size": 10_000}).json()
    data = (rollout_model / "model.safetensors").read_bytes()
    truncated = tmp_path / "model.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    r = post(url, "/update_weights_from_disk", {"model_path": str(truncated)})
    assert r.status_code == 400 and r.json()["success"] is False
    assert r.json()["message"] == (f"Failed to update weights: {truncated}: not a readable safetensors file (Error while "
                                   "deserializing header: incomplete metadata, file not fully covered)")
    # A directory whose first shard is fine and whose second is cut short: nothing is loaded.
    shards = tmp_path / "sharded"
    shards.mkdir()
    shutil.copy(rollout_model / "model.safetensors", shards / "a.safetensors")
    (shards / "b.safetensors").write_bytes(data[:100])
    r = post(url, "/update_weights_from_disk", {"model_path": str(shards)})
    assert r.status_code == 400 and f"{shards / 'b.safetensors'}: not a readable safetensors file" in r.json()["message"]
    assert post(url, "/get_weights_by_name", {"name": name, "truncate_size": 10_000}).json() == before
    prompt = make_prompts(1, seed=51)[0]
    out = post(url, "/generate", {"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 10}}).json()
    assert out["output_ids"] == hf_greedy(hf, prompt, 10)


def test_unexpected_errors_are_json_naming_them(url: str, tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text("{}")  # an index without its weight_map
    r = post(url, "/update_weights_from_disk", {"model_path": str(tmp_path)})
    assert r.status_code == 500
    assert r.json() == {"object": "error", "type": "InternalServerError", "param": None, "code": 500,
                        "message": "/update_weights_from_disk failed: KeyError: 'weight_map'"}
    assert requests.get(url + "/health_generate", timeout=30).status_code == 200


def test_limits_defaults_and_their_check(capsys: pytest.CaptureFixture) -> None:
    cfg = parse_args(["--model-path", "m"])
    assert (cfg.max_sequences_per_request, cfg.max_queued_sequences) == (1024, 8192)
    with pytest.raises(SystemExit):
        parse_args(["--model-path", "m", "--max-sequences-per-request", "100", "--max-queued-sequences", "99"])
    assert ("--max-queued-sequences (99) must be at least --max-sequences-per-request (100), or the largest allowed "
            "request could never be queued") in capsys.readouterr().err
