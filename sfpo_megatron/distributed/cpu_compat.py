"""Lets megatron-core's CUDA-only code paths run on a CPU-only torch (gloo).

megatron-core 0.16.1 assumes a GPU in ~50 places.
Rather than forking megatron, this module redirects the CUDA *API* it calls to CPU equivalents,
process-wide, once:

* ``torch.cuda.current_device()`` returns ``torch.device("cpu")`` (global memory buffer, param/grad
  buffers, p2p communication, distributed optimizer, rotary ``inv_freq``, dist_checkpointing);
* tensor factories (``torch.zeros(..., device="cuda")`` etc.) and ``Tensor.cuda()`` land on CPU,
  ``pin_memory=True`` is dropped;
* streams, events, ``synchronize`` and NVTX ranges become no-ops (CPU ops are synchronous);
* the CUDA RNG API maps to the CPU generator, so megatron's RNG tracker
  (``model_parallel_cuda_manual_seed``, ``get_cuda_rng_tracker().fork()``) forks the CPU state the
  same way it forks the CUDA state on GPUs;
* the MoE alltoall dispatcher's token counts become numpy arrays as they do when megatron copies
  them off a GPU (``all_to_all_single`` takes split sizes as sequences, not tensors);
* ``Tensor.type()`` of a CPU tensor reports ``torch.cuda.*Tensor`` so the optimizers' dtype checks
  (``param.type() == 'torch.cuda.FloatTensor'``) take their normal branches.

The Adam megatron builds without TE / apex (the same on CPU and GPU) lives in
``sfpo_megatron/components/adam.py``.

``apply()`` is called only by :func:`sfpo_megatron.distributed.platform.setup_platform` and only
when CUDA is unavailable; with CUDA it is never invoked, and it refuses to run if it were.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any

import megatron.core.tensor_parallel.random as mcore_random
import megatron.core.transformer.moe.token_dispatcher as mcore_token_dispatcher
import torch
import torch.utils._device as torch_device

_APPLIED = False
_CPU = torch.device("cpu")

# Factories that take a ``device`` keyword and that megatron calls with device="cuda".
_FACTORIES = (
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn",
    "randint", "zeros_like", "ones_like", "empty_like", "full_like", "linspace", "empty_strided",
)


def _to_cpu_device(device: Any) -> Any:
    if device is None:
        return None
    if isinstance(device, int):
        return _CPU
    if isinstance(device, str):
        return _CPU if device.startswith("cuda") else device
    if isinstance(device, torch.device):
        return _CPU if device.type == "cuda" else device
    return device


def _wrap_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    wrapper.__sfpo_cpu_compat__ = True
    return wrapper


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: CPU work is synchronous, so waiting is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event or _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _tensor_type(orig):
    cuda_names = {
        torch.float32: "torch.cuda.FloatTensor",
        torch.float16: "torch.cuda.HalfTensor",
        torch.bfloat16: "torch.cuda.BFloat16Tensor",
    }

    @functools.wraps(orig)
    def type_(self, *args, **kwargs):
        if not args and not kwargs and self.device.type == "cpu" and self.dtype in cuda_names:
            return cuda_names[self.dtype]
        return orig(self, *args, **kwargs)

    return type_


class _RngForkWarningFilter(logging.Filter):
    # The tracker warns when the CPU RNG moves inside a fork: on CPU the forked state *is* the CPU
    # state, so the warning is always true and means nothing.
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.empty_cache = lambda: None
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    cuda.nvtx.range = lambda *a, **k: contextlib.nullcontext()
    # CUDA RNG → the CPU generator (dropout and init on CPU draw from it).
    cuda.get_rng_state = lambda device=None: torch.get_rng_state()
    cuda.set_rng_state = lambda state, device=None: torch.set_rng_state(state)
    # torch.manual_seed itself calls cuda.manual_seed_all: seed the generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0


def _patch_factories_and_tensor() -> None:
    # `with torch.device(...)` recognises factories by identity from a list it builds (and
    # caches) on first use: build it from the originals, or meta-device init lands on CPU.

    torch_device._device_constructors()
    for name in _FACTORIES:
        fn = getattr(torch, name)
        if not getattr(fn, "__sfpo_cpu_compat__", False):
            setattr(torch, name, _wrap_factory(fn))
    torch.Tensor.cuda = lambda self, *a, **k: self
    orig_to = torch.Tensor.to

    @functools.wraps(orig_to)
    def to(self, *args, **kwargs):
        if args and isinstance(args[0], (str, torch.device, int)) and not isinstance(args[0], bool):
            if not isinstance(args[0], int) or len(args) == 1:
                args = (_to_cpu_device(args[0]),) + args[1:]
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return orig_to(self, *args, **kwargs)

    torch.Tensor.to = to
    torch.Tensor.type = _tensor_type(torch.Tensor.type)


def _patch_megatron() -> None:
    def _get_state(device=None, clone=False, graph_safe=False):
        return torch.get_rng_state()

    def _set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    # megatron converts the dispatcher's split sizes to numpy only when they are CUDA tensors
    move = mcore_token_dispatcher.maybe_move_tensor_to_cpu

    @functools.wraps(move)
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    mcore_token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    mcore_random._get_cuda_rng_state = _get_state
    mcore_random._set_cuda_rng_state = _set_state
    logging.getLogger(mcore_random.__name__).addFilter(_RngForkWarningFilter())


def apply() -> None:
    """Patch once; refuses to run where CUDA is available (it would hide the GPU)."""
    global _APPLIED
    if _APPLIED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu_compat.apply() must not be used when CUDA is available")
    _patch_torch_cuda()
    _patch_factories_and_tensor()
    _patch_megatron()
    _APPLIED = True


def is_applied() -> bool:
    return _APPLIED
