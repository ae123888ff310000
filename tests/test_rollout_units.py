"""Rollout pieces that need no server: buckets, disk layout, launcher / transport / router errors."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from hf_reference import hf_log_softmax, load_hf, make_prompts, perturbed_state
from launch import SERVER_ENV, child_env
from tiny_models import EOS, ROLLOUT_VOCAB

from sfpo_megatron.cpu_server.server import RequestError, parse_generate_request
from sfpo_megatron.distributed import weight_update_group
from sfpo_megatron.rollout import transport
from sfpo_megatron.rollout.client import RolloutClient, RolloutServerError, RouterUnavailableError
from sfpo_megatron.rollout.sglang_launcher import (
    LaunchConfig,
    RolloutLauncher,
    SGLangNotInstalledError,
    split_sglang_args,
)


def _named(sizes: list[int]) -> list[tuple[str, torch.Tensor]]:
    return [(f"w{i}", torch.zeros(s, dtype=torch.float32)) for i, s in enumerate(sizes)]


def test_iter_buckets_packs_in_order_within_budget() -> None:
    buckets = list(transport.iter_buckets(_named([10, 10, 10, 30, 5, 5]), bucket_bytes=80))
    assert [[n for n, _ in b] for b in buckets] == [["w0", "w1"], ["w2"], ["w3"], ["w4", "w5"]]
    for b in buckets:  # a tensor over the budget (w3: 120 bytes) travels alone
        assert sum(transport.tensor_bytes(t) for _, t in b) <= 80 or len(b) == 1


def test_iter_buckets_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="bucket_bytes must be positive, got 0"):
        list(transport.iter_buckets(_named([1]), 0))
    with pytest.raises(ValueError, match="weight 'w' appears twice"):
        list(transport.iter_buckets([("w", torch.zeros(1)), ("w", torch.zeros(1))], 100))
    with pytest.raises(TypeError, match="weight 'w' is a list"):
        list(transport.iter_buckets([("w", [1.0])], 100))


def test_mixed_buckets_flatten_small_tensors_aside() -> None:
    big = 1 << 20  # bytes from which a tensor travels on its own
    named = [("a", torch.zeros(big // 4)), ("s0", torch.zeros(3)), ("b", torch.zeros(big // 4)),
             ("s1", torch.zeros(5, dtype=torch.bfloat16)), ("c", torch.zeros(big // 4)), ("s2", torch.zeros(7))]
    out = list(transport.iter_mixed_buckets(named, bucket_bytes=2 * big, flat_bytes=20))
    # Large ones in order within the budget, sent tensor by tensor; small ones (3*4, 5*2, 7*4
    # bytes) in flat buckets of at most 20 bytes, in order; each bucket leaves once full.
    assert [([n for n, _ in b], flat) for b, flat in out] == [
        (["s0"], True), (["a", "b"], False), (["s1"], True), (["c"], False), (["s2"], True)]


def test_flattened_bucket_is_the_bytes_back_to_back() -> None:
    tensors = [torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
               torch.tensor([[7]], dtype=torch.int64)]
    flat = transport.flatten_bucket(tensors)
    expected = b"".join(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes()
                        for t in tensors)
    assert flat.dtype == torch.uint8 and bytes(flat.numpy()) == expected


def test_dtype_names_round_trip() -> None:
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert weight_update_group.parse_dtype(weight_update_group.dtype_name(dt)) is dt
    assert weight_update_group.parse_dtype("torch.bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float99'"):
        weight_update_group.parse_dtype("float99")


def test_disk_transport_writes_a_loadable_sharded_checkpoint(tmp_path: Path, rollout_model: Path) -> None:
    model_dir = rollout_model
    state = perturbed_state(model_dir, seed=3)

    class NoServer:  # DiskTransport.write needs no server
        pass

    dt = transport.DiskTransport(NoServer(), tmp_path / "push", bucket_bytes=50_000, config_dir=model_dir)  # type: ignore[arg-type]
    path, ntensors, nshards, nbytes = dt.write(state.items(), "step-7")
    assert path == tmp_path / "push" / "weights_step-7" and nshards > 1 and ntensors == len(state)
    assert nbytes == sum(transport.tensor_bytes(t) for t in state.values())
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state) and index["metadata"]["weight_version"] == "step-7"
    assert sorted(os.listdir(path)) == sorted(
        [f"model-{i:05d}-of-{nshards:05d}.safetensors" for i in range(1, nshards + 1)]
        + ["model.safetensors.index.json", "config.json", "generation_config.json"]
    )
    assert not [p for p in (tmp_path / "push").iterdir() if p.name.startswith(".")]  # no temp dir left
    reloaded = load_hf(path).state_dict()
    assert all(torch.equal(reloaded[n], state[n]) for n in state)


def test_split_sglang_args() -> None:
    rest, sg = split_sglang_args(
        ["--lr", "1e-5", "--sglang-context-length", "8192", "--sglang-enable-torch-compile", "--sglang-dp=2", "--x"]
    )
    assert rest == ["--lr", "1e-5", "--x"]
    assert sg == ["--context-length", "8192", "--enable-torch-compile", "--dp", "2"]
    with pytest.raises(ValueError, match="bad pass-through flag '--sglang-'"):
        split_sglang_args(["--sglang-"])


def test_launcher_validates_and_needs_sglang(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--rollout-tp-size must be 1, got 2"):
        RolloutLauncher(LaunchConfig(model_path="m", backend="cpu", tp_size=2))
    with pytest.raises(ValueError, match="--rollout-backend must be one of"):
        RolloutLauncher(LaunchConfig(model_path="m", backend="vllm"))
    if "sglang" in sys.modules or __import__("importlib").util.find_spec("sglang") is not None:
        pytest.skip("sglang is installed here")
    with pytest.raises(SGLangNotInstalledError, match="--rollout-backend sglang needs the sglang package"):
        RolloutLauncher(LaunchConfig(model_path="m", backend="sglang"))


def test_sglang_command_line_is_built_per_engine() -> None:
    launcher = RolloutLauncher.__new__(RolloutLauncher)  # command building needs no sglang install
    launcher.cfg = LaunchConfig(model_path="/m", backend="sglang", num_engines=2, tp_size=2, mem_fraction_static=0.7,
                                extra_args=["--context-length", "4096"], api_key="k", weight_version="v0", gpu_offset=4)
    cmd = launcher.build_command(1, 30001)
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    assert " ".join(cmd[3:]) == ("--model-path /m --tp-size 2 --host 127.0.0.1 --port 30001 --base-gpu-id 6 "
                                 "--mem-fraction-static 0.7 --api-key k --weight-version v0 --context-length 4096")


def test_gpu_only_paths_fail_clearly_on_cpu() -> None:
    client = RolloutClient(["http://127.0.0.1:9"])
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(transport.TransportUnavailableError, match="CUDA IPC handles .* torch.cuda.is_available\\(\\) is False"):
        transport.TensorTransport(client)
    with pytest.raises(weight_update_group.WeightUpdateGroupError, match="backend 'nccl' needs CUDA"):
        weight_update_group.init_weight_update_group("127.0.0.1", 1, 0, 2, backend="nccl")
    with pytest.raises(ValueError, match="unknown refit transport 'rdma'"):
        transport.make_transport("rdma", client)
    if __import__("importlib").util.find_spec("sglang_router") is None:
        with pytest.raises(RouterUnavailableError, match="needs the sglang_router package"):
            RolloutClient(["http://127.0.0.1:9"], use_router=True)


def test_request_parsing_expands_batches_like_sglang() -> None:
    req = parse_generate_request(
        {"input_ids": [[1, 2], [3]], "sampling_params": {"n": 2, "max_new_tokens": 4, "sampling_seed": 5}, "rid": "r"},
        vocab_size=ROLLOUT_VOCAB, context_length=64, tokenizer=None,
    )
    # prompt-major order, as SGLang's tokenizer manager returns n > 1 batches
    assert [(s.rid, s.prompt_ids, s.sample_index) for s in req.seqs] == [
        ("r_0", [1, 2], 0), ("r_1", [1, 2], 1), ("r_2", [3], 0), ("r_3", [3], 1)
    ]
    assert not req.is_single and req.seqs[0].params.seed == 5
    with pytest.raises(RequestError, match=r"^return_logprob: a per-prompt list cannot be combined with n=2"):
        parse_generate_request({"input_ids": [[1], [2]], "sampling_params": {"n": 2}, "return_logprob": [True, False]},
                               ROLLOUT_VOCAB, 64, None)


def test_engine_return_original_logprob_reports_the_raw_distribution(rollout_model: Path) -> None:
    """SGLANG_RETURN_ORIGINAL_LOGPROB semantics: log_softmax(logits), not of logits / temperature."""
    from sfpo_megatron.cpu_server.server import GenerationEngine, SamplingConfig, SeqSpec

    model = load_hf(rollout_model)
    prompt = make_prompts(1, seed=9)[0]
    spec = SeqSpec("r", prompt, SamplingConfig(max_new_tokens=6, temperature=0.6, seed=1, ignore_eos=True), 0, True, -1, 0, None)
    got = {}
    for original in (False, True):
        engine = GenerationEngine(model, eos_token_ids={EOS}, return_original_logprob=original)
        engine.start()
        try:
            (seq,) = engine.submit([spec])
            got[original] = seq.future.result(timeout=60)
        finally:
            engine.shutdown()
    ids = got[True]["output_ids"]
    assert ids == got[False]["output_ids"]  # same seed, same tokens; only the reported numbers differ
    for original, temperature in ((True, 1.0), (False, 0.6)):
        ref = hf_log_softmax(model, prompt + ids, temperature)
        expected = torch.stack([ref[len(prompt) - 1 + k, t] for k, t in enumerate(ids)])
        lps = torch.tensor([lp for lp, _, _ in got[original]["meta_info"]["output_token_logprobs"]])
        assert (lps - expected).abs().max().item() < 1e-4


LAUNCH = '''
import sys, time
from sfpo_megatron.rollout.sglang_launcher import LaunchConfig, RolloutLauncher

# Two real CPU rollout servers through the launcher's start / health / stop path.
launcher = RolloutLauncher(LaunchConfig(model_path=sys.argv[3], num_engines=2, log_dir=sys.argv[1],
                                        health_timeout_s=300))
launcher.start()
print(" ".join(str(p.pid) for p in launcher.processes), flush=True)
if sys.argv[2] == "wait":
    time.sleep(300)
'''


@pytest.mark.parametrize("ending", ["sigterm", "normal-exit"])
def test_launcher_stops_engines_on_signal_and_at_exit(tmp_path: Path, rollout_model: Path, ending: str) -> None:
    import signal
    import subprocess
    import time

    script = tmp_path / "launch.py"
    script.write_text(LAUNCH)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "logs"), "wait" if ending == "sigterm" else "exit",
                             str(rollout_model)], stdout=subprocess.PIPE, text=True, env=child_env(**SERVER_ENV))
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2
    if ending == "sigterm":
        for pid in pids:
            os.kill(pid, 0)  # alive while the launcher runs
        proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 20
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _running(p)]
        time.sleep(0.1)
    assert not alive, f"engines {alive} outlived the launcher ({ending})"
    assert sorted(os.listdir(tmp_path / "logs")) == ["engine_0.log", "engine_1.log"]


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split()[2] == "Z")  # a zombie has exited


def test_admin_get_survives_a_connection_the_server_closed() -> None:
    """A keep-alive connection closed by the server without an answer (idle timeout race): an
    idempotent GET is retried once on a fresh connection; a POST is not (it may have acted)."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    served: list[str] = []

    def serve() -> None:
        for i in range(3):
            conn, _ = listener.accept()
            request = conn.recv(65536).decode(errors="replace")
            served.append(request.split(" ", 2)[0])
            if i in (0, 2):  # the first GET's connection and the POST: closed without an answer
                conn.close()
                continue
            body = b'{"weight_version": "7"}'
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    client = RolloutClient([url])
    try:
        assert client.get_weight_version() == {url: "7"}
        with pytest.raises(RolloutServerError, match="/flush_cache: ConnectionError"):
            client.call(url, "/flush_cache", {}, method="POST")
        assert served == ["GET", "GET", "POST"]
    finally:
        thread.join(10)
        listener.close()
