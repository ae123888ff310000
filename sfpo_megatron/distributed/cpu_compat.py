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
* ``Tensor.type()`` of a CPU tensor reports ``torch.cuda.*Tensor`` so the optimizers' dtype checks
  (``param.type() == 'torch.cuda.FloatTensor'``) take their normal branches;
* megatron's torch-AdamW fallback (used when neither TE nor apex is installed) is replaced with
  :class:`ParamGroupStepAdamW`, which keeps the step count in ``param_groups`` like the fused Adam
  used on GPUs: torch's AdamW cannot round-trip a distributed-optimizer checkpoint.

``apply()`` is called only by :func:`sfpo_megatron.distributed.platform.setup_platform` and only
when CUDA is unavailable; with CUDA it is never invoked, and it refuses to run if it were.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any

import megatron.core.optimizer as mcore_optimizer
import megatron.core.optimizer.distrib_optimizer as mcore_distrib_optimizer
import megatron.core.tensor_parallel.random as mcore_random
import torch
import torch.utils._device as torch_device
from torch.optim.adam import adam as adam_functional

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


class ParamGroupStepAdamW(torch.optim.Optimizer):
    """AdamW whose step count lives in ``param_groups`` (the layout of apex/TE FusedAdam).

    The math is torch's own single-tensor Adam(W) (``torch.optim.adam.adam``), so results equal
    ``torch.optim.AdamW(foreach=False)``. Megatron's distributed optimizer reads and writes the
    step from the param group in its checkpoints; torch's AdamW keeps it per parameter, which
    megatron cannot restore (wrong step count after load).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 adam_w_mode: bool = True, amsgrad: bool = False, **unused):
        if amsgrad:
            raise ValueError("ParamGroupStepAdamW does not implement amsgrad")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        adam_w_mode=adam_w_mode)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
            if not params:
                continue
            # torch's functional adam increments the step tensors itself before using them.
            previous = int(group.get("step", 0))
            steps = [torch.tensor(float(previous)) for _ in params]
            group["step"] = previous + 1
            beta1, beta2 = group["betas"]
            adam_functional(
                params, grads, exp_avgs, exp_avg_sqs, [], steps,
                foreach=False, capturable=False, differentiable=False, fused=None,
                grad_scale=None, found_inf=None, has_complex=False, amsgrad=False,
                beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                eps=group["eps"], maximize=False, decoupled_weight_decay=group["adam_w_mode"],
            )
        return loss


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

    mcore_random._get_cuda_rng_state = _get_state
    mcore_random._set_cuda_rng_state = _set_state
    logging.getLogger(mcore_random.__name__).addFilter(_RngForkWarningFilter())
    # Without TE/apex megatron picks torch AdamW; give it the param-group-step Adam instead.
    mcore_optimizer.Adam = ParamGroupStepAdamW
    mcore_distrib_optimizer.Adam = ParamGroupStepAdamW
    # Checkpoint code then treats it as the apex FusedAdam layout (step in param_groups).
    mcore_distrib_optimizer.HAVE_APEX_OR_TE = True
    mcore_distrib_optimizer.USING_APEX_OPTIMIZER = True
    mcore_optimizer.USING_PYTORCH_OPTIMIZER = False


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
