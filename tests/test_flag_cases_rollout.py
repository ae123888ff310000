"""Rollout-side flags of `rl` / `eval`, parsed by the real parser and consumed by the code `rl`
consumes them with (``dataset_kwargs`` → ``load_prompt_dataset``, ``PromptSampler``,
``RolloutWorker``, ``eval_params``, ``RolloutEngines``), against a real CPU rollout server
(``python -m sfpo_megatron.cpu_server.server``) serving the tiny rollout model:

* the prompt flags change the exact ids sent to the server (independently rendered here);
* ``--rollout-top-k 1`` and a tiny ``--rollout-top-p`` make every sample of a prompt the greedy
  continuation (HF ``generate``), while the defaults sample different ones;
* ``--disable-std-normalization`` / ``--advantage-eps`` give the advantages computed here from the
  rewards the worker got;
* the eval sampling flags map to the eval request's fields, and ``--eval-max-response-len``
  bounds the evaluated responses;
* the rollout client / launcher flags reach the client, the transport and the launched servers;
* ``--max-resample-rounds``: with rewards that always agree, dynamic sampling refills exactly
  that many times; the reward flags give the runner's worker processes (each reward is its
  worker's pid) and time limit (a hanging reward scores 0, counted).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
from hf_reference import hf_greedy, load_hf
from launch import free_port
from transformers import AutoTokenizer

from sfpo_megatron.arguments import build_rl_parser
from sfpo_megatron.data.prompts import PromptSampler, dataset_kwargs, load_eval_datasets, load_prompt_dataset
from sfpo_megatron.data.rewards import RewardRunner, reward_runner_from_args
from sfpo_megatron.data.tokenizer import TokenizerError, load_tokenizer, tokenizer_from_args
from sfpo_megatron.rl.evaluate import eval_params, evaluate
from sfpo_megatron.rollout.client import RolloutClient
from sfpo_megatron.rollout.engines import RolloutEngines
from sfpo_megatron.rollout.generate import RolloutWorker

ROWS = [{"question": "one two three", "solution": "four", "prompt": "WRONG KEY", "answer": "wrong"},
        {"question": "the quick brown", "solution": "fox", "prompt": "WRONG KEY", "answer": "wrong"},
        {"question": "jumps over the", "solution": "lazy", "prompt": "WRONG KEY", "answer": "wrong"}]
PROMPT_FLAGS = ["--prompt-key", "question", "--answer-key", "solution", "--system-prompt", "Be brief.",
                "--prompt-template", "Q: {prompt} A:"]


def letter_o(response: str, answer: str, metadata: dict[str, Any]) -> float:
    """1 when the response contains an "o": a mixed signal for a random tiny model."""
    return 1.0 if "o" in response else 0.0


def always_one(response: str, answer: str, metadata: dict[str, Any]) -> float:
    """Every group's rewards agree: dynamic sampling drops them all."""
    return 1.0


def pid_or_hang(response: str, answer: str, metadata: dict[str, Any]) -> float:
    """The worker's pid (after a pause, so that concurrent samples spread over the workers);
    the answer "hang" never returns."""
    time.sleep(30 if answer == "hang" else 0.3)
    return float(os.getpid())


@pytest.fixture(scope="module")
def rollout_server_options() -> dict[str, Any]:
    return {"weight_version": "0"}  # samples carry it as an int


def two_free_ports() -> int:
    """A port p with p + 1 also free (the launcher numbers its servers from --rollout-port-base)."""
    while True:
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


@pytest.fixture(scope="module")
def env(rollout_model: Path, rollout_server: Any) -> dict:
    data = rollout_model.parent / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with RewardRunner(f"{__name__}:letter_o", num_workers=1, timeout_s=30) as rewards:
        yield {"model": rollout_model, "data": data, "url": rollout_server.urls[0], "rewards": rewards,
               "tokenizer": load_tokenizer(str(rollout_model))}


def parse(env: dict, *flags: str):
    return build_rl_parser().parse_args(["--model-config", str(env["model"]), "--prompt-data",
                                         str(env["data"]), "--no-chat-template", *flags])


def collect(env: dict, args, step: int = 1):
    """One rollout batch the way `rl` builds it from the args (rank 0's data and worker)."""
    tok = env["tokenizer"]
    dataset = load_prompt_dataset(args.prompt_data, tok, **dataset_kwargs(args))
    sampler = PromptSampler(dataset, args.rollout_batch_size, seed=args.seed)
    worker = RolloutWorker(args, RolloutClient([env["url"]]), tok, dataset, sampler, env["rewards"])
    return dataset, worker.collect(step, None)


@pytest.mark.flags("--prompt-key", "--answer-key", "--system-prompt", "--prompt-template",
                   "--no-chat-template")
def test_prompt_flags_change_the_ids_sent_to_the_server(env):
    args = parse(env, *PROMPT_FLAGS, "--rollout-batch-size", "3", "--n-samples-per-prompt", "1",
                 "--rollout-max-response-len", "2")
    dataset, batch = collect(env, args)
    hf_tok = AutoTokenizer.from_pretrained(env["model"])
    sent = {tuple(s.prompt_ids) for s in batch.samples}
    expected = {tuple(hf_tok.encode(f"Be brief.\nQ: {r['question']} A:", add_special_tokens=False))
                for r in ROWS}
    assert sent == expected
    assert sorted(dataset[i].answer for i in range(len(ROWS))) == sorted(r["solution"] for r in ROWS)
    # Without --no-chat-template the prompts go through the tokenizer's chat template, which this
    # base tokenizer lacks.
    chat = build_rl_parser().parse_args(["--model-config", str(env["model"]), "--prompt-data",
                                         str(env["data"]), *PROMPT_FLAGS])
    with pytest.raises(TokenizerError, match="has no chat template"):
        load_prompt_dataset(chat.prompt_data, env["tokenizer"], **dataset_kwargs(chat))[0]


@pytest.mark.flags("--tokenizer-path")
def test_tokenizer_path_names_the_tokenizer(env, tmp_path):
    """A --model-config directory without a tokenizer: rl loads the one --tokenizer-path names,
    and without the flag stops naming the directory it looked in."""
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(env["model"] / "config.json", config_only / "config.json")
    flags = ["--prompt-data", str(env["data"])]
    args = build_rl_parser().parse_args(["--model-config", str(config_only), "--tokenizer-path",
                                         str(env["model"]), *flags])
    text = "Q: what is one plus two? A:"
    hf_tok = AutoTokenizer.from_pretrained(env["model"])
    assert tokenizer_from_args(args).encode(text) == hf_tok.encode(text, add_special_tokens=False)
    with pytest.raises(TokenizerError, match=f"no tokenizer in '{config_only}'"):
        tokenizer_from_args(build_rl_parser().parse_args(["--model-config", str(config_only), *flags]))


def _groups(batch) -> dict[int, list]:
    out: dict[int, list] = {}
    for s in batch.samples:
        out.setdefault(s.group_id, []).append(s)
    return out


@pytest.mark.flags("--rollout-top-k", "--rollout-top-p", "--rollout-max-response-len",
                   "--n-samples-per-prompt")
@pytest.mark.parametrize("flags", [["--rollout-top-k", "1"], ["--rollout-top-p", "1e-6"], []])
def test_top_k_one_and_tiny_top_p_sample_the_greedy_continuation(env, flags):
    args = parse(env, "--rollout-batch-size", "2", "--n-samples-per-prompt", "3",
                 "--rollout-max-response-len", "5", "--seed", "1", *flags)
    _, batch = collect(env, args)
    groups = _groups(batch)
    assert len(groups) == 2 and all(len(g) == 3 for g in groups.values())
    assert all(len(s.response_ids) <= 5 for s in batch.samples)
    distinct = {tuple(tuple(s.response_ids) for s in g) for g in groups.values()}
    if not flags:  # temperature 1, no truncation: the samples of a prompt differ
        assert any(len(set(g)) > 1 for g in distinct)
        return
    hf = load_hf(env["model"])
    for g in groups.values():
        greedy = hf_greedy(hf, g[0].prompt_ids, 5)
        for s in g:
            assert s.response_ids == greedy[:len(s.response_ids)]


def _advantages(rewards: list[float], eps: float, std: bool) -> list[float]:
    mean = sum(rewards) / len(rewards)
    if not std:
        return [r - mean for r in rewards]
    sd = statistics.stdev(rewards)
    return [0.0 if sd == 0 else (r - mean) / (sd + eps) for r in rewards]


@pytest.mark.flags("--disable-std-normalization", "--advantage-eps", "--rollout-batch-size", "--seed")
@pytest.mark.parametrize("flags, eps, std", [
    (["--advantage-eps", "0.25"], 0.25, True),
    (["--disable-std-normalization"], 1e-6, False),
])
def test_advantage_flags(env, flags, eps, std):
    args = parse(env, "--rollout-batch-size", "3", "--n-samples-per-prompt", "4",
                 "--rollout-max-response-len", "4", "--seed", "2", *flags)
    _, batch = collect(env, args)
    groups = _groups(batch)
    assert len(groups) == 3
    mixed = [g for g in groups.values() if len({s.reward for s in g}) > 1]
    assert mixed, "the case needs a group with mixed rewards"
    for g in groups.values():
        want = _advantages([s.reward for s in g], eps, std)
        assert [s.advantage for s in g] == pytest.approx(want, rel=1e-6, abs=1e-9)
    # The other setting would have given other advantages.
    g = mixed[0]
    other = _advantages([s.reward for s in g], 1e-6, not std)
    assert [s.advantage for s in g] != pytest.approx(other, rel=1e-3)


@pytest.mark.flags("--eval-temperature", "--eval-top-p", "--eval-max-response-len",
                   "--n-samples-per-eval-prompt", cmd=("rl", "eval"))
def test_eval_sampling_flags(env):
    args = parse(env, *PROMPT_FLAGS, "--eval-temperature", "0.6", "--eval-top-p", "0.9",
                 "--eval-max-response-len", "3", "--rollout-max-response-len", "7",
                 "--rollout-temperature", "1.3", "--rollout-top-k", "11",
                 "--eval-prompt-data", f"val={env['data']}", "--n-samples-per-eval-prompt", "2")
    tok = env["tokenizer"]
    params = eval_params(args, tok)
    assert params == {"max_new_tokens": 3, "temperature": 0.6, "top_p": 0.9, "top_k": 11,
                      "stop_token_ids": [tok.eos_id]}
    datasets = load_eval_datasets(args.eval_prompt_data, tok, **dataset_kwargs(args))
    metrics = evaluate(RolloutClient([env["url"]]), datasets, tok, env["rewards"],
                       n=args.n_samples_per_eval_prompt, params=params, seed=args.seed, step=0,
                       expected_version=None)
    assert 0 < metrics["eval/val/response_length"] <= 3
    assert "eval/val/avg@2" in metrics and "eval/val/pass@2" in metrics
    # Without --eval-max-response-len the eval uses the rollout length.
    assert eval_params(parse(env), tok)["max_new_tokens"] == 64


@pytest.mark.flags("--rollout-max-concurrency", "--rollout-timeout", "--rollout-retries",
                   "--update-weight-buffer-size")
def test_client_flags_reach_the_client_and_transport(env, tmp_path):
    args = parse(env, "--rollout-backend", "external", "--rollout-urls", env["url"],
                 "--rollout-max-concurrency", "3", "--rollout-timeout", "7.5", "--rollout-retries", "5",
                 "--weight-transport", "disk", "--update-weight-buffer-size", "12345")
    engines = RolloutEngines(args, str(env["model"]), tmp_path)
    engines._connect(list(args.rollout_urls))
    c = engines.client
    assert (c.max_concurrency, c.timeout, c.retries) == (3, 7.5, 5)
    assert engines.transport.bucket_bytes == 12345


@pytest.mark.flags("--rollout-num-servers", "--rollout-port-base", "--rollout-host")
def test_launched_servers_follow_the_flags(env, tmp_path):
    port = two_free_ports()
    args = parse(env, "--rollout-num-servers", "2", "--rollout-port-base", str(port),
                 "--rollout-host", "127.0.0.1", "--rollout-deterministic")
    engines = RolloutEngines(args, str(env["model"]), tmp_path)
    try:
        urls = engines._launch(str(env["model"]), 0)
        assert urls == [f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"]
        assert engines.client.health() == {u: True for u in urls}
    finally:
        if engines.launcher is not None:
            engines.launcher.stop()


@pytest.mark.flags("--max-resample-rounds")
@pytest.mark.parametrize("rounds", [0, 2])
def test_max_resample_rounds_bounds_the_refills(env, rounds):
    args = parse(env, "--dynamic-sampling", "--max-resample-rounds", str(rounds), "--rollout-batch-size", "1",
                 "--n-samples-per-prompt", "2", "--rollout-max-response-len", "2")
    tok = env["tokenizer"]
    dataset = load_prompt_dataset(args.prompt_data, tok, **dataset_kwargs(args))
    with RewardRunner(f"{__name__}:always_one", num_workers=1, timeout_s=30) as rewards:
        worker = RolloutWorker(args, RolloutClient([env["url"]]), tok, dataset,
                               PromptSampler(dataset, 1, seed=args.seed), rewards)
        batch = worker.collect(1, None)
    # The first round and `rounds` refills, every group dropped; one pads the batch back.
    assert batch.metrics["rollout/dynamic_rounds"] == rounds + 1
    assert batch.metrics["rollout/dynamic_dropped_groups"] == rounds + 1
    assert batch.metrics["rollout/dynamic_padded_groups"] == 1 and len(batch.samples) == 2


@pytest.mark.slow  # waits out a reward timeout with three workers
@pytest.mark.flags("--reward-num-workers", "--reward-timeout")
def test_reward_flags_give_the_workers_and_the_time_limit(env, caplog):
    args = parse(env, "--reward-fn", f"{__name__}:pid_or_hang", "--reward-num-workers", "3",
                 "--reward-timeout", "2")
    answers = ["a"] * 6 + ["hang"]
    with reward_runner_from_args(args) as runner:
        rewards, errors, timeouts = runner.score_counted(["x"] * 7, answers)
    assert rewards[-1] == 0.0 and (errors, timeouts) == (0, 1)
    assert len(set(rewards[:-1])) == 3  # three worker processes shared the six samples
    assert os.getpid() not in rewards
    # Given up after --reward-timeout (the default is 10 s); worker start-up does not count.
    assert "reward pid_or_hang timed out after 2.0 s on sample 6" in caplog.text
