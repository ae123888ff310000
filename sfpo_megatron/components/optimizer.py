"""Megatron optimizer (optionally the distributed, sharded one) and its LR scheduler."""

from __future__ import annotations

import argparse
import logging

import torch
import torch.distributed as dist
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from sfpo_megatron.components.adam import use_param_group_step_adam
from sfpo_megatron.distributed.platform import current_platform

log = logging.getLogger(__name__)


def build_optimizer(args: argparse.Namespace, model_chunks: list):
    """megatron's optimizer for the chunks; TE/apex FusedAdam where installed, else the
    param-group-step Adam (:mod:`sfpo_megatron.components.adam`), on CPU and GPU alike.

    ``--optimizer-cpu-offload`` (GPU): megatron-core's HybridDeviceOptimizer steps the whole
    shard with torch's AdamW on the host; the distributed optimizer keeps its fp32 main-param
    shard on the GPU and copies the host result back after each step."""
    use_param_group_step_adam()
    cpu_offload = _optimizer_cpu_offload(args)
    config = OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.bf16, fp16=False, params_dtype=_dtype(args),
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_param_gather_with_optimizer_step=False,
        optimizer_cpu_offload=cpu_offload, optimizer_offload_fraction=1.0 if cpu_offload else 0.0,
    )
    return get_megatron_optimizer(config, model_chunks)


def _optimizer_cpu_offload(args: argparse.Namespace) -> bool:
    if not getattr(args, "optimizer_cpu_offload", False):
        return False
    if not current_platform().is_cuda:
        if not dist.is_initialized() or dist.get_rank() == 0:
            log.info("--optimizer-cpu-offload: no GPU on this machine, the optimizer already runs in "
                     "host memory: nothing to offload")
        return False
    return True


def build_scheduler(args: argparse.Namespace, optimizer, total_steps: int):
    """Megatron's OptimizerParamScheduler, stepped once per ``step()`` call of the caller.

    Pretraining steps it once per iteration; RL once per rollout batch (SFPO's default).
    """
    decay = args.lr_decay_iters or total_steps
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if args.lr_warmup_iters else args.lr, max_lr=args.lr,
        min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=max(decay, args.lr_warmup_iters + 1), lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=max(decay, 1),
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True)


def _dtype(args):
    return torch.bfloat16 if args.bf16 else torch.float32


def optimizer_state_bytes(optimizer) -> dict[str, int]:
    """Bytes this rank holds in fp32 main params and Adam state (exp_avg, exp_avg_sq).

    With the distributed optimizer both are this rank's shard only.
    """
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    main, state = 0, 0
    seen: set[int] = set()
    for opt in inner:
        base = getattr(opt, "optimizer", opt)
        for group in base.param_groups:
            for p in group["params"]:
                if id(p) in seen:
                    continue
                seen.add(id(p))
                main += p.numel() * p.element_size()
                for v in base.state.get(p, {}).values():
                    if isinstance(v, torch.Tensor):
                        state += v.numel() * v.element_size()
    return {"optimizer/main_param_bytes": main, "optimizer/adam_state_bytes": state}
