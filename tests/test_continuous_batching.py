"""Continuous batching in the CPU rollout server (a real process): requests of mixed prompt lengths
and max_new_tokens arriving at staggered times join the running batch and leave it when done, and
every result equals what transformers gives for that request alone; the token budget
(--max-total-tokens) and the batch limit (--max-running-requests) bound the running batch; the
scheduler metrics are on /get_server_info."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from hf_reference import hf_log_softmax, load_hf, make_prompts
from launch import SERVER_ENV

from sfpo_megatron.cpu_server.engine import GenerationEngine
from sfpo_megatron.cpu_server.requests import SamplingConfig, SeqSpec
from sfpo_megatron.cpu_server.server import parse_args
from sfpo_megatron.rollout.sglang_launcher import LaunchConfig, RolloutLauncher

# (prompt length, max_new_tokens, delay in s before the request is sent)
STAGGERED = [(3, 40, 0.0), (17, 4, 0.02), (9, 25, 0.05), (31, 12, 0.08), (5, 64, 0.1), (12, 7, 0.15),
             (24, 33, 0.2), (2, 9, 0.3), (40, 18, 0.35), (7, 51, 0.45)]


@pytest.fixture(scope="module")
def rollout_server_options() -> dict[str, Any]:
    return {"extra_args": ["--max-running-requests", "6"], "health_timeout_s": 180}


@pytest.fixture(scope="module")
def hf(rollout_model: Path) -> torch.nn.Module:
    return load_hf(rollout_model)


@pytest.fixture(scope="module")
def url(rollout_server: Any) -> str:
    return rollout_server.urls[0]


def generate(url: str, **body: Any) -> Any:
    r = requests.post(url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def staggered(url: str, jobs: list[tuple[list[int], dict, float]]) -> list[Any]:
    """Send each (prompt, sampling_params, delay) from its own thread after its delay, all at once
    otherwise; the results in job order."""
    results: list[Any] = [None] * len(jobs)
    start = time.monotonic()

    def one(i: int) -> None:
        prompt, sp, delay = jobs[i]
        time.sleep(max(0.0, start + delay - time.monotonic()))
        results[i] = generate(url, input_ids=prompt, sampling_params=sp, return_logprob=True)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None for r in results)
    return results


def prompt_of(length: int, seed: int) -> list[int]:
    return make_prompts(1, length=length, seed=seed)[0]


@torch.no_grad()
def test_staggered_mixed_requests_equal_transformers(url: str, hf: torch.nn.Module) -> None:
    """Greedy: every output, logprob and finish reason equals transformers on that prompt alone,
    whatever joined or left the batch around it (fp32, logprobs within 1e-5 relative)."""
    jobs = [(prompt_of(n, 100 + i), {"temperature": 0, "max_new_tokens": m}, d) for i, (n, m, d) in enumerate(STAGGERED)]
    outs = staggered(url, jobs)
    for (prompt, sp, _), out in zip(jobs, outs):
        m = sp["max_new_tokens"]
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=m, do_sample=False, pad_token_id=300)[0, len(prompt):].tolist()
        if 300 in ref:
            ref = ref[: ref.index(300) + 1]
        assert out["output_ids"] == ref
        expected = {"type": "stop", "matched": 300} if ref[-1] == 300 else {"type": "length", "length": m}
        assert out["meta_info"]["finish_reason"] == expected
        lps = out["meta_info"]["output_token_logprobs"]
        ref_lp = hf_log_softmax(hf, prompt + ref)
        expected_lp = torch.tensor([ref_lp[len(prompt) - 1 + k, tok].item() for k, tok in enumerate(ref)])
        # fp32 rounding of batched, padded matmuls: 1e-5 relative to the logprob's size (at least 1).
        got = torch.tensor([lp for lp, _, _ in lps])
        assert ((got - expected_lp).abs() / expected_lp.abs().clamp(min=1)).max().item() < 1e-5


@torch.no_grad()
def test_seeded_sampling_does_not_depend_on_the_batch(url: str, hf: torch.nn.Module) -> None:
    """A seeded sample drawn among staggered neighbours equals the same request alone, and the
    documented sampler: token k ~ softmax(logits / T) with a CPU generator seeded seed + sample index."""
    sp = {"temperature": 0.8, "max_new_tokens": 30, "ignore_eos": True, "sampling_seed": 5}
    target = prompt_of(6, 7)
    alone = generate(url, input_ids=target, sampling_params=sp, return_logprob=True)
    crowd = [(prompt_of(n, 200 + i), {"temperature": 1.0, "max_new_tokens": m, "sampling_seed": i}, d)
             for i, (n, m, d) in enumerate(STAGGERED[:6])]
    outs = staggered(url, crowd[:3] + [(target, sp, 0.04)] + crowd[3:])
    among = outs[3]
    assert among["output_ids"] == alone["output_ids"]
    got = torch.tensor([lp for lp, _, _ in among["meta_info"]["output_token_logprobs"]])
    want = torch.tensor([lp for lp, _, _ in alone["meta_info"]["output_token_logprobs"]])
    assert (got - want).abs().max().item() < 1e-5
    g = torch.Generator().manual_seed(5)
    ids = list(target)
    for _ in range(30):
        probs = torch.softmax(hf(torch.tensor([ids])).logits[0, -1].float() / 0.8, dim=-1)
        ids.append(int(torch.multinomial(probs, 1, generator=g)[0]))
    assert among["output_ids"] == ids[len(target):]


def test_server_info_reports_scheduler_metrics(url: str) -> None:
    generate(url, input_ids=prompt_of(5, 1), sampling_params={"temperature": 0, "max_new_tokens": 8, "ignore_eos": True})
    state = requests.get(url + "/get_server_info", timeout=10).json()["internal_states"][0]
    assert state["max_running_requests"] == 6 and state["max_total_num_tokens"] is None
    assert state["num_running_reqs"] == 0 and state["num_waiting_reqs"] == 0
    assert state["last_gen_throughput"] > 0  # tokens generated within the last 10 s


def test_token_budget_bounds_the_running_batch(rollout_model: Path) -> None:
    """--max-total-tokens 60 with requests reserving 5 + 40 tokens each: one runs at a time, the
    others wait (seen on /get_load while they run), and all finish."""
    cfg = LaunchConfig(model_path=str(rollout_model), backend="cpu", log_dir=str(rollout_model.parent / "logs_budget"),
                       env=SERVER_ENV, health_timeout_s=180, extra_args=["--max-total-tokens", "60"])
    with RolloutLauncher(cfg) as launched:
        url = launched.urls[0]
        jobs = [(prompt_of(5, 300 + i), {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}, 0.0) for i in range(3)]
        seen: list[dict] = []
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                seen.append(requests.get(url + "/get_load", timeout=10).json()[0])
                time.sleep(0.002)

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            outs = staggered(url, jobs)
        finally:
            done.set()
            poller.join(timeout=10)
        assert all(len(o["output_ids"]) == 40 for o in outs)
        assert max(s["num_running_reqs"] for s in seen) == 1
        assert any(s["num_waiting_reqs"] > 0 for s in seen)
        state = requests.get(url + "/get_server_info", timeout=10).json()["internal_states"][0]
        assert state["max_total_num_tokens"] == 60


def test_batch_flags_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = parse_args(["--model-path", "m", "--max-running-requests", "3", "--max-total-tokens", "500"])
    assert (cfg.max_batch_size, cfg.max_total_tokens) == (3, 500)
    with pytest.raises(SystemExit):
        parse_args(["--model-path", "m", "--max-total-tokens", "0"])
    assert "--max-total-tokens must be >= 1, got 0" in capsys.readouterr().err


def test_one_sequence_per_forward_is_bitwise_reproducible(hf: torch.nn.Module) -> None:
    """--max-running-requests 1 (the trainer's --rollout-deterministic): seeded samples and their
    logprobs are bitwise the same whatever was submitted around them, and in whichever order."""
    engine = GenerationEngine(hf, eos_token_ids={300}, max_batch_size=1)
    engine.start()
    try:
        def run(order: list[int], crowd: int) -> dict[int, tuple[list[int], list[float]]]:
            specs = []
            for i in order:
                sp = SamplingConfig(max_new_tokens=10 + 3 * i, temperature=0.9, top_p=0.95, seed=40 + i, ignore_eos=True)
                specs.append(SeqSpec(f"s{i}-{crowd}", prompt_of(3 + 5 * i, 50 + i), sp, 0, True, -1, 0, None))
            for j in range(crowd):  # greedy neighbours submitted in between
                specs.insert(2 * j, SeqSpec(f"g{j}-{crowd}", prompt_of(8 + j, 90 + j), SamplingConfig(max_new_tokens=6, temperature=0),
                                            0, False, -1, 0, None))
            outs = {s.rid: s.future.result(timeout=120) for s in engine.submit(specs)}
            return {i: (outs[f"s{i}-{crowd}"]["output_ids"], [lp for lp, _, _ in outs[f"s{i}-{crowd}"]["meta_info"]["output_token_logprobs"]])
                    for i in order}

        assert run([0, 1, 2, 3], 0) == run([3, 1, 0, 2], 3)
    finally:
        engine.shutdown()


def test_requests_sent_together_share_one_prefill(hf: torch.nn.Module) -> None:
    """An idle engine whose decode step takes 200 ms waits a few ms for the requests that arrive
    with the first one (a client's concurrent calls land milliseconds apart): one prefill for all,
    rather than late ones joining after a step and finishing a step behind their batch."""
    engine = GenerationEngine(hf, eos_token_ids={300})
    engine._step_s = 0.2  # as measured by a previous batch of a large model
    engine.start()
    try:
        seqs = []
        for i in range(3):
            spec = SeqSpec(f"t{i}", prompt_of(4 + i, 70 + i), SamplingConfig(max_new_tokens=3, temperature=0), 0, False, -1, 0, None)
            seqs += engine.submit([spec])
            time.sleep(0.003)
        assert all(len(s.future.result(timeout=60)["output_ids"]) == 3 for s in seqs)
        assert (engine.stats["batches"], engine.stats["prefills"]) == (1, 1)
    finally:
        engine.shutdown()


def test_prefill_head_gets_one_gemm_input(hf: torch.nn.Module) -> None:
    """The server loads its model with requires_grad off, where torch's matmul turns the head's
    strided last-position view into a broadcast batched GEMM (~1.6x the prefill): the engine hands
    the head a contiguous input, and the logits stay those of transformers."""
    head = hf.get_output_embeddings()
    hf.requires_grad_(False)
    engine = GenerationEngine(hf, eos_token_ids={300})
    seen: list[bool] = []
    probe = head.register_forward_pre_hook(lambda _, args: seen.append(args[0].is_contiguous()))
    engine.start()
    try:
        prompts = [prompt_of(n, 80 + n) for n in (5, 9)]
        specs = [SeqSpec(f"h{i}", p, SamplingConfig(max_new_tokens=2, temperature=0), 0, True, -1, 0, None)
                 for i, p in enumerate(prompts)]
        outs = [s.future.result(timeout=60) for s in engine.submit(specs)]
        assert seen and all(seen)
        for p, out in zip(prompts, outs):
            ref = hf_log_softmax(hf, p + out["output_ids"][:1])[len(p) - 1]
            assert out["output_ids"][0] == int(ref.argmax())
            assert abs(out["meta_info"]["output_token_logprobs"][0][0] - float(ref.max())) < 1e-5
    finally:
        probe.remove()
        engine.shutdown()
        hf.requires_grad_(True)
