"""The CPU rollout server as a real process on 127.0.0.1, checked against HF transformers."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from hf_reference import hf_greedy, hf_log_softmax, load_hf, make_prompts
from tiny_models import EOS, ROLLOUT_VOCAB

API_KEY = "test-key"
MAX_BYTES = 64 * 1024
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def rollout_server_options() -> dict[str, Any]:
    return {"api_key": API_KEY, "extra_args": ["--max-request-bytes", str(MAX_BYTES), "--max-batch-size", "16"],
            "health_timeout_s": 180}


@pytest.fixture(scope="module")
def hf(rollout_model: Path) -> torch.nn.Module:
    return load_hf(rollout_model)


@pytest.fixture(scope="module")
def url(rollout_server: Any) -> str:
    return rollout_server.urls[0]


def post(url: str, path: str, body: Any = None, raw: bytes | None = None, auth: bool = True, timeout: float = 60) -> requests.Response:
    headers = dict(AUTH) if auth else {}
    if raw is not None:
        return requests.post(url + path, data=raw, headers={**headers, "Content-Type": "application/json"}, timeout=timeout)
    return requests.post(url + path, json=body, headers=headers, timeout=timeout)


def generate(url: str, **body: Any) -> Any:
    r = post(url, "/generate", body)
    assert r.status_code == 200, r.text
    return r.json()


def test_greedy_single_requests_equal_transformers_generate(url: str, hf: torch.nn.Module) -> None:
    for prompt in make_prompts(4, seed=1):
        out = generate(url, input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": 24})
        ref = hf_greedy(hf, prompt, 24)
        assert out["output_ids"] == ref
        expected = {"type": "stop", "matched": EOS} if ref[-1] == EOS and len(ref) < 24 else {"type": "length", "length": 24}
        assert out["meta_info"]["finish_reason"] == expected
        assert out["meta_info"]["prompt_tokens"] == len(prompt) and out["meta_info"]["completion_tokens"] == len(ref)


def test_greedy_batches_equal_transformers_generate(url: str, hf: torch.nn.Module) -> None:
    prompts = make_prompts(6, seed=2)  # different lengths: left padding inside the server's batch
    refs = [hf_greedy(hf, p, 20) for p in prompts]
    outs = generate(url, input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": 20})
    assert [o["output_ids"] for o in outs] == refs
    # Separate concurrent requests are batched by the engine too.
    results: dict[int, list[int]] = {}

    def one(i: int) -> None:
        results[i] = generate(url, input_ids=prompts[i], sampling_params={"temperature": 0, "max_new_tokens": 20})["output_ids"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(prompts))] == refs


def test_requests_join_a_running_batch(url: str, hf: torch.nn.Module) -> None:
    """Continuous batching: short requests arriving while a long one decodes are merged into its
    batch (caches re-padded on either side) and finish first; every output still equals HF."""
    long_prompt = make_prompts(1, length=4, seed=8)[0]
    short = [make_prompts(1, length=n, seed=20 + n)[0] for n in (2, 30, 60, 9)]
    done: dict[str, tuple[float, list[int]]] = {}

    def run(key: str, prompt: list[int], n: int) -> None:
        # min_new_tokens masks EOS on both sides (HF's MinNewTokensLength processor does the same).
        out = generate(url, input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": n, "min_new_tokens": n})
        done[key] = (time.monotonic(), out["output_ids"])

    long_t = threading.Thread(target=run, args=("long", long_prompt, 320))
    long_t.start()
    deadline = time.monotonic() + 30
    while requests.get(url + "/get_load", headers=AUTH, timeout=5).json()[0]["num_running_reqs"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    threads = [threading.Thread(target=run, args=(str(i), p, 12)) for i, p in enumerate(short)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    long_t.join(timeout=120)
    assert all(done[str(i)][0] < done["long"][0] for i in range(len(short))), "short requests waited for the long batch"
    with torch.no_grad():
        def greedy_no_eos(prompt: list[int], n: int) -> list[int]:
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=EOS)
            return out[0, len(prompt):].tolist()

        for i, p in enumerate(short):
            assert done[str(i)][1] == greedy_no_eos(p, 12)
        assert done["long"][1] == greedy_no_eos(long_prompt, 320)


@pytest.mark.parametrize("params", [
    {"temperature": 1.0},
    {"temperature": 0.7, "top_p": 0.9, "top_k": 40},
])
def test_sampled_token_logprobs_equal_a_forward_pass(url: str, hf: torch.nn.Module, params: dict) -> None:
    prompts = make_prompts(3, seed=3)
    outs = generate(url, input_ids=prompts, return_logprob=True,
                    sampling_params={**params, "max_new_tokens": 16, "sampling_seed": 7, "ignore_eos": True})
    for prompt, out in zip(prompts, outs):
        ids, lps = out["output_ids"], out["meta_info"]["output_token_logprobs"]
        assert [t for _, t, _ in lps] == ids and all(text is None for _, _, text in lps)
        # SGLang's default: the temperature-scaled distribution, before top-k / top-p filtering.
        ref = hf_log_softmax(hf, prompt + ids, params["temperature"])
        expected = torch.stack([ref[len(prompt) - 1 + k, tok] for k, tok in enumerate(ids)])
        got = torch.tensor([lp for lp, _, _ in lps])
        assert (got - expected).abs().max().item() < 1e-4
        if "top_k" in params:  # every sampled token is inside the top-k set
            for k, tok in enumerate(ids):
                assert tok in torch.topk(ref[len(prompt) - 1 + k], params["top_k"]).indices.tolist()


def test_seeds_make_sampling_reproducible(url: str) -> None:
    prompt = make_prompts(1, seed=4)[0]
    sp = {"temperature": 1.0, "max_new_tokens": 12, "ignore_eos": True}
    a = generate(url, input_ids=prompt, sampling_params={**sp, "sampling_seed": 11})["output_ids"]
    b = generate(url, input_ids=prompt, sampling_params={**sp, "seed": 11})["output_ids"]  # alias
    assert a == b
    many = generate(url, input_ids=prompt, sampling_params={**sp, "sampling_seed": 11, "n": 3})
    assert isinstance(many, list) and many[0]["output_ids"] == a  # sample k uses seed + k
    for k in (1, 2):
        single = generate(url, input_ids=prompt, sampling_params={**sp, "sampling_seed": 11 + k})["output_ids"]
        assert many[k]["output_ids"] == single
    assert len({tuple(m["output_ids"]) for m in many}) > 1


def test_stop_token_ids_stop_strings_and_min_new_tokens(url: str, hf: torch.nn.Module) -> None:
    from transformers import AutoTokenizer

    prompt = make_prompts(1, seed=5)[0]
    ref = hf_greedy(hf, prompt, 30)
    stop_tok = ref[4]
    first = ref.index(stop_tok)
    out = generate(url, input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": 30, "stop_token_ids": [stop_tok]})
    assert out["output_ids"] == ref[: first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_tok}
    # min_new_tokens masks stop tokens until reached (so the output now differs from ref after `first`).
    out = generate(url, input_ids=prompt, sampling_params={
        "temperature": 0, "max_new_tokens": 30, "stop_token_ids": [stop_tok], "min_new_tokens": first + 2})
    assert len(out["output_ids"]) >= first + 2 and stop_tok not in out["output_ids"][: first + 2]
    # Stop strings: the first step whose decoded text contains the string ends the sequence.
    tok = AutoTokenizer.from_pretrained(hf.name_or_path)
    stop_str = tok.decode([ref[6]])
    end = next(s for s in range(1, len(ref) + 1) if stop_str in tok.decode(ref[:s]))
    out = generate(url, input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": 30, "stop": [stop_str]})
    assert out["output_ids"] == ref[:end]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_str}
    full = tok.decode(ref[:end])
    assert out["text"] == full[: full.index(stop_str)]


def test_text_input_and_prompt_logprobs(url: str, hf: torch.nn.Module) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf.name_or_path)
    text = "the quick brown fox jumps"
    ids = tok.encode(text)
    out = generate(url, text=text, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                   logprob_start_len=0, top_logprobs_num=ROLLOUT_VOCAB)
    assert out["output_ids"] == [] and out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    lp = out["meta_info"]["input_token_logprobs"]
    assert [t for _, t, _ in lp] == ids and lp[0][0] is None
    ref = hf_log_softmax(hf, ids)
    got = torch.tensor([v for v, _, _ in lp[1:]])
    assert (got - ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]).abs().max().item() < 1e-4
    # top_logprobs_num = vocab gives the whole distribution at each position
    for k, row in enumerate(out["meta_info"]["input_top_logprobs"][1:]):
        full = torch.full((ROLLOUT_VOCAB,), float("nan"))
        for v, i, _ in row:
            full[i] = v
        assert (full - ref[k]).abs().max().item() < 1e-4
    out = generate(url, text=text, sampling_params={"temperature": 0, "max_new_tokens": 8})
    assert out["output_ids"] == hf_greedy(hf, ids, 8)
    assert out["text"] == tok.decode([t for t in out["output_ids"] if t != EOS])


@pytest.mark.parametrize("raw, field, message", [
    (b'{"input_ids": [1, 2', "body", "malformed JSON"),
    (b'{"input_ids": [1, 2], "sampling_params": {"temperature": NaN}}', "body", "NaN is not valid JSON"),
    (b'[1, 2, 3]', "body", "expected a JSON object, got list"),
    (b'{"sampling_params": {}}', "input_ids", "give exactly one of text or input_ids"),
    (b'{"input_ids": "hello"}', "input_ids", "expected a non-empty list"),
    (b'{"input_ids": [1, 2.5]}', "input_ids[1]", "token id must be an integer in [0, 319], got 2.5"),
    (b'{"input_ids": [1, 320]}', "input_ids[1]", "got 320"),
    (b'{"input_ids": [[1], []]}', "input_ids[1]", "expected a non-empty list of token ids"),
    (b'{"input_ids": [1], "sampling_params": {"max_new_tokens": "ten"}}', "sampling_params.max_new_tokens", "expected an integer, got 'ten'"),
    (b'{"input_ids": [1], "sampling_params": {"max_new_tokens": true}}', "sampling_params.max_new_tokens", "expected an integer, got True"),
    (b'{"input_ids": [1], "sampling_params": {"temperature": -0.5}}', "sampling_params.temperature", "non-negative"),
    (b'{"input_ids": [1], "sampling_params": {"top_p": 1.5}}', "sampling_params.top_p", "must be in (0, 1], got 1.5"),
    (b'{"input_ids": [1], "sampling_params": {"top_k": 0}}', "sampling_params.top_k", "-1 (disable) or at least 1, got 0"),
    (b'{"input_ids": [1], "sampling_params": {"min_p": 2}}', "sampling_params.min_p", "must be in [0, 1], got 2.0"),
    (b'{"input_ids": [1], "sampling_params": {"n": 0}}', "sampling_params.n", "must be >= 1, got 0"),
    (b'{"input_ids": [1], "sampling_params": {"stop_token_ids": [999]}}', "sampling_params.stop_token_ids[0]", "must be <= 319"),
    (b'{"input_ids": [1], "sampling_params": {"temprature": 1}}', "sampling_params.temprature", "unknown sampling parameter"),
    (b'{"input_ids": [1], "sampling_params": {"regex": "a+"}}', "sampling_params.regex", "constrained decoding is not supported"),
    (b'{"input_ids": [1], "sampling_params": {"max_new_tokens": 600}}', "sampling_params.max_new_tokens", "exceed the context length 512"),
    (b'{"input_ids": [1], "return_logprob": "yes"}', "return_logprob", "expected true or false, got 'yes'"),
    (b'{"input_ids": [[1], [2]], "sampling_params": [{}]}', "sampling_params", "has 1 entries for 2 prompts"),
    (b'{"input_ids": [1, 2], "logprob_start_len": 5}', "logprob_start_len", "not below the prompt length 2"),
    (b'{"input_embeds": [[0.1]]}', "input_embeds", "not supported"),
    (b'{"input_ids": [1], "rid": 5}', "rid", "expected a string"),
])
def test_bad_requests_get_400_naming_the_problem(url: str, raw: bytes, field: str, message: str) -> None:
    r = post(url, "/generate", raw=raw)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["param"] == field and body["message"].startswith(f"{field}: ") and message in body["message"], body


def test_oversized_request_gets_400(url: str) -> None:
    big = b'{"input_ids": [' + b"1, " * (MAX_BYTES // 3) + b"1]}"
    r = post(url, "/generate", raw=big)
    assert r.status_code == 400 and f"over this server's --max-request-bytes limit of {MAX_BYTES}" in r.json()["message"]


def test_api_key_is_required_except_for_health(url: str) -> None:
    assert post(url, "/generate", {"input_ids": [1]}, auth=False).status_code == 401
    assert requests.get(url + "/get_model_info", timeout=10).status_code == 401
    assert requests.get(url + "/get_model_info", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    assert requests.get(url + "/health", timeout=10).status_code == 200
    assert requests.get(url + "/health_generate", timeout=30).status_code == 200


def test_info_routes_answer_under_old_and_new_names(url: str, rollout_model: Path) -> None:
    get = lambda path: requests.get(url + path, headers=AUTH, timeout=10)  # noqa: E731
    old, new = get("/get_model_info").json(), get("/model_info").json()
    assert old == new and old["model_path"] == str(rollout_model)
    assert old["is_generation"] and old["weight_version"] == "default"
    info, info_new = get("/get_server_info").json(), get("/server_info").json()
    assert info["context_length"] == info_new["context_length"] == 512 and "api_key" not in info
    assert get("/get_weight_version").json() == {"weight_version": "default"}
    assert post(url, "/flush_cache").status_code == 200
    load = get("/get_load").json()
    assert load[0]["num_reqs"] == 0


def test_unimplemented_fields_are_accepted_and_logged_once(url: str, rollout_server: Any) -> None:
    for _ in range(2):
        generate(url, input_ids=[1, 2], sampling_params={"max_new_tokens": 2}, lora_path="adapter", bootstrap_room=3)
    log = rollout_server.log_paths[0].read_text()
    assert log.count("/generate field 'lora_path' is not implemented by the CPU rollout server") == 1
    assert log.count("/generate field 'bootstrap_room' is not implemented") == 1


def test_update_weights_from_tensor_is_refused_without_unpickling(url: str) -> None:
    r = post(url, "/update_weights_from_tensor", {"serialized_named_tensors": ["gASVAAAA"], "flush_cache": True})
    assert r.status_code == 501 and "CUDA IPC handles between colocated GPU processes" in r.json()["message"]
    r = post(url, "/update_weights_from_tensor", {"serialized_named_tensors": 3})
    assert r.status_code == 400 and r.json()["param"] == "serialized_named_tensors"


def test_pause_in_place_then_continue_and_pause_abort(url: str, hf: torch.nn.Module) -> None:
    prompt = make_prompts(1, seed=6)[0]
    ref = hf_greedy(hf, prompt, 16)
    assert post(url, "/pause_generation", {"mode": "in_place"}).status_code == 200
    box: dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.update(out=generate(url, input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": 16})))
    t.start()
    deadline = time.monotonic() + 30
    while requests.get(url + "/get_load", headers=AUTH, timeout=5).json()[0]["num_waiting_reqs"] == 0:
        assert time.monotonic() < deadline, "the request never reached the server's queue"
        time.sleep(0.01)
    # The server holds it: queued, nothing generated, the caller still waiting.
    load = requests.get(url + "/get_load", headers=AUTH, timeout=5).json()[0]
    assert (load["num_waiting_reqs"], load["num_running_reqs"]) == (1, 0) and t.is_alive()
    assert post(url, "/continue_generation", {}).status_code == 200
    t.join(timeout=30)
    assert box["out"]["output_ids"] == ref
    # mode "abort" (SGLang's default) ends in-flight work with finish_reason abort.
    t = threading.Thread(target=lambda: box.update(out=generate(
        url, input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": 400, "ignore_eos": True})))
    t.start()
    deadline = time.monotonic() + 30
    while requests.get(url + "/get_load", headers=AUTH, timeout=5).json()[0]["num_reqs"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert post(url, "/pause_generation", {}).status_code == 200
    t.join(timeout=30)
    assert box["out"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(box["out"]["output_ids"]) < 400
    assert post(url, "/continue_generation", {}).status_code == 200


def test_release_and_resume_memory_keep_the_weights(url: str, hf: torch.nn.Module) -> None:
    prompt = make_prompts(1, seed=7)[0]
    ref = hf_greedy(hf, prompt, 10)
    r = post(url, "/release_memory_occupation", {})
    assert r.status_code == 200 and r.json()["success"]
    r = post(url, "/generate", {"input_ids": prompt})
    assert r.status_code == 503 and "/resume_memory_occupation" in r.json()["message"]
    r = post(url, "/release_memory_occupation", {"tags": ["vram"]})
    assert r.status_code == 400 and "unknown tags ['vram']" in r.json()["message"]
    assert post(url, "/resume_memory_occupation", {"tags": ["weights", "kv_cache"]}).json()["success"]
    assert generate(url, input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": 10})["output_ids"] == ref


def test_update_weight_version_only(url: str) -> None:
    r = post(url, "/update_weight_version", {"new_version": "v7"})
    assert r.json() == {"success": True, "message": "Weight version updated to v7", "new_version": "v7"}
    out = generate(url, input_ids=[5, 6], sampling_params={"max_new_tokens": 1})
    assert out["meta_info"]["weight_version"] == "v7"
    post(url, "/update_weight_version", {"new_version": "default"})


def test_weight_update_errors_are_400_with_success_false(url: str, tmp_path: Path) -> None:
    r = post(url, "/update_weights_from_disk", {"model_path": str(tmp_path / "missing")})
    assert r.status_code == 400 and r.json()["success"] is False and "neither a directory" in r.json()["message"]
    r = post(url, "/update_weights_from_distributed", {"names": ["x"], "dtypes": ["float32"], "shapes": [[1]]})
    assert r.status_code == 400 and "call /init_weights_update_group first" in r.json()["message"]
    r = post(url, "/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1,
                                                  "world_size": 2, "backend": "nccl"})
    assert r.status_code == 400 and "'gloo' only" in r.json()["message"]
