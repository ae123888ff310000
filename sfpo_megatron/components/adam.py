"""The Adam(W) megatron builds where no fused Adam (Transformer Engine / apex) is installed.

megatron-core 0.16.1 chooses its Adam once, when ``megatron.core.optimizer`` is imported:
Transformer Engine's FusedAdam, else apex's, else ``torch.optim.AdamW``. The fused Adams keep the
step count in ``param_groups`` and megatron's distributed optimizer checkpoints it from there;
torch's AdamW keeps it per parameter, and the distributed optimizer cannot round-trip that (the
step comes back wrong after a load, and with it Adam's bias correction). Every machine without
TE or apex (any CPU run, and a plain ``pip install`` on a CUDA box) would get that fallback.

:func:`use_param_group_step_adam` (called by :func:`sfpo_megatron.components.optimizer.build_optimizer`
before megatron builds its optimizer) replaces the fallback with :class:`ParamGroupStepAdamW`,
which has the fused Adams' layout, and tells megatron's checkpoint code so. Where TE or apex is
installed it changes nothing.
"""

from __future__ import annotations

import megatron.core.optimizer as mcore_optimizer
import megatron.core.optimizer.distrib_optimizer as mcore_distrib_optimizer
import torch
from torch.optim.adam import adam as adam_functional

# What megatron chose at import (read before anything here changes its module state).
if mcore_distrib_optimizer.USING_TE_OPTIMIZER:
    _MEGATRON_ADAM = "transformer_engine"
elif mcore_distrib_optimizer.USING_APEX_OPTIMIZER:
    _MEGATRON_ADAM = "apex"
else:
    _MEGATRON_ADAM = "torch"
PARAM_GROUP_STEP = "param_group_step"


class ParamGroupStepAdamW(torch.optim.Optimizer):
    """AdamW whose step count lives in ``param_groups`` (the layout of apex/TE FusedAdam).

    The math is torch's own Adam(W) (``torch.optim.adam.adam``): single-tensor by default on CPU,
    so results equal ``torch.optim.AdamW(foreach=False)``; multi-tensor (``foreach``) for CUDA
    parameters, as torch's AdamW picks there. Megatron's distributed optimizer reads and writes
    the step from the param group in its checkpoints.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 adam_w_mode: bool = True, amsgrad: bool = False, foreach: bool | None = None,
                 **unused):
        if amsgrad:
            raise ValueError("ParamGroupStepAdamW does not implement amsgrad")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        adam_w_mode=adam_w_mode, foreach=foreach)
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
            foreach = group.get("foreach")
            if foreach is None:
                foreach = all(p.is_cuda for p in params)
            # torch's functional adam increments the (host) step tensors itself before using them.
            previous = int(group.get("step", 0))
            steps = [torch.tensor(float(previous)) for _ in params]
            group["step"] = previous + 1
            beta1, beta2 = group["betas"]
            adam_functional(
                params, grads, exp_avgs, exp_avg_sqs, [], steps,
                foreach=foreach, capturable=False, differentiable=False, fused=None,
                grad_scale=None, found_inf=None, has_complex=False, amsgrad=False,
                beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                eps=group["eps"], maximize=False, decoupled_weight_decay=group["adam_w_mode"],
            )
        return loss


def megatron_adam() -> str:
    """The Adam megatron builds now: ``transformer_engine``, ``apex``, ``param_group_step``
    (after :func:`use_param_group_step_adam` without a fused Adam) or ``torch`` (before it)."""
    if mcore_optimizer.Adam is ParamGroupStepAdamW:
        return PARAM_GROUP_STEP
    return _MEGATRON_ADAM


def use_param_group_step_adam() -> str:
    """Where megatron fell back to torch's AdamW, make it build :class:`ParamGroupStepAdamW`
    and checkpoint its step from ``param_groups``; idempotent. Returns :func:`megatron_adam`."""
    if _MEGATRON_ADAM == "torch":
        mcore_optimizer.Adam = ParamGroupStepAdamW
        # megatron then passes adam_w_mode= (the fused Adams' keyword), not torch's AdamW/Adam split.
        mcore_optimizer.USING_PYTORCH_OPTIMIZER = False
        mcore_distrib_optimizer.Adam = ParamGroupStepAdamW
        # The distributed optimizer's state_dict / load_state_dict then take the FusedAdam branch.
        mcore_distrib_optimizer.HAVE_APEX_OR_TE = True
        mcore_distrib_optimizer.USING_APEX_OPTIMIZER = True
    return megatron_adam()
