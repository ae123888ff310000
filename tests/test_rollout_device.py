"""Where the CPU rollout server's model runs (`--rollout-device` of the trainer, `--device` of the
server): checked before anything starts, with messages that name the flag. The CUDA placement
itself runs in the GPU validation kit (benchmarks/gpu_check.py, step rl)."""

from __future__ import annotations

import pytest
import torch
from launch import PYTHON, run

from sfpo_megatron.arguments import build_rl_parser
from sfpo_megatron.cpu_server.server import parse_args
from sfpo_megatron.errors import UserError
from sfpo_megatron.rollout.engines import RolloutConfigError, check_rollout_args

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the behaviour without CUDA")


def rl_args(*flags: str):
    return build_rl_parser().parse_args(["--model-config", "unused", *flags])


def test_default_is_cpu_and_cuda_is_a_choice():
    assert rl_args().rollout_device == "cpu"
    assert parse_args(["--model-path", "m"]).device == "cpu"
    check_rollout_args(rl_args("--rollout-device", "cpu"))  # no error


@pytest.mark.flags("--rollout-device")
@no_cuda
def test_trainer_refuses_cuda_without_a_gpu():
    with pytest.raises(RolloutConfigError) as e:
        check_rollout_args(rl_args("--rollout-device", "cuda"))
    assert isinstance(e.value, UserError)
    assert str(e.value) == ("--rollout-device cuda: torch.cuda.is_available() is False here; "
                            "use --rollout-device cpu")


@pytest.mark.flags("--rollout-device", "--rollout-backend")
def test_device_is_for_the_cpu_backend_only():
    with pytest.raises(RolloutConfigError) as e:
        check_rollout_args(rl_args("--rollout-device", "cuda", "--rollout-backend", "sglang"))
    assert str(e.value) == ("--rollout-device cuda places the CPU rollout server's model; "
                            "--rollout-backend sglang servers choose their own devices")


@no_cuda
def test_server_refuses_cuda_without_a_gpu():
    proc = run([PYTHON, "-m", "sfpo_megatron.cpu_server.server", "--model-path", "unused",
                "--device", "cuda"], check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "error: --device cuda: torch.cuda.is_available() is False here (no GPU, or a CPU-only torch); "
        "use --device cpu")


def test_server_help_shows_the_flag():
    out = run([PYTHON, "-m", "sfpo_megatron.cpu_server.server", "--help"], timeout=120).stdout
    assert "--device {cpu,cuda}" in out
