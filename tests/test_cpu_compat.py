"""The CPU compatibility layer: each redirected CUDA call behaves as megatron needs on CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from launch import child_env

from sfpo_megatron.distributed import cpu_compat
from sfpo_megatron.distributed.platform import setup_platform


@pytest.fixture(scope="module", autouse=True)
def platform():
    return setup_platform()


def test_platform_is_cpu_gloo(platform):
    assert (platform.device_type, platform.backend) == ("cpu", "gloo")
    assert cpu_compat.is_applied()
    assert setup_platform() is platform  # one switch, applied once


def test_cuda_device_calls_land_on_cpu():
    assert torch.cuda.current_device() == torch.device("cpu")
    for make in (lambda: torch.zeros(3, device="cuda"),
                 lambda: torch.tensor([1.0], device=torch.cuda.current_device()),
                 lambda: torch.empty(2, device=torch.device("cuda", 0), pin_memory=True),
                 lambda: torch.ones(2).cuda(),
                 lambda: torch.ones(2).to("cuda"),
                 lambda: torch.ones(2).to(device=torch.cuda.current_device())):
        assert make().device.type == "cpu"
    # dtype conversions through .to() are untouched
    assert torch.ones(2).to(torch.float64).dtype == torch.float64


def test_streams_events_sync_are_noops():
    s = torch.cuda.Stream(device=torch.cuda.current_device())
    with torch.cuda.stream(s):
        x = torch.ones(2) * 2
    torch.cuda.current_stream().wait_stream(s)
    ev = torch.cuda.Event()
    ev.record()
    ev.synchronize()
    torch.cuda.synchronize()
    assert x.tolist() == [2.0, 2.0]


def test_tensor_type_reports_cuda_names_for_megatron_checks():
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(1, dtype=torch.float16).type() == "torch.cuda.HalfTensor"
    assert torch.zeros(1).type(torch.float64).dtype == torch.float64  # conversion form intact


def test_rng_tracker_forks_cpu_state_reproducibly():
    from megatron.core import tensor_parallel

    from sfpo_megatron.distributed import parallel

    parallel.initialize(tp=1, pp=1, seed=1)  # one process: world size 1
    tensor_parallel.model_parallel_cuda_manual_seed(123, force_reset_rng=True)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    with tracker.fork():
        a = torch.rand(3)
    after = torch.rand(1)
    assert torch.equal(before, after), "fork must restore the default generator"
    tensor_parallel.model_parallel_cuda_manual_seed(123, force_reset_rng=True)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        b = torch.rand(3)
    assert torch.equal(a, b), "same seed, same forked stream"
    # the tracker state is independent of the default stream
    assert not torch.equal(a, before.expand(3))


def test_refuses_to_patch_when_cuda_is_available():
    # A fresh interpreter that believes a GPU is present must not have its CUDA calls hidden.
    code = ("import torch; torch.cuda.is_available = lambda: True\n"
            "from sfpo_megatron.distributed import cpu_compat\n"
            "try:\n    cpu_compat.apply()\nexcept RuntimeError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=child_env(), timeout=120)
    assert "refused: cpu_compat.apply() must not be used when CUDA is available" in out.stdout


def test_device_context_still_works():
    # transformers builds models under `with torch.device("meta")` before loading weights
    with torch.device("meta"):
        t = torch.zeros(3)
        lin = torch.nn.Linear(2, 2)
    assert t.device.type == "meta" and lin.weight.device.type == "meta"
