"""Build the trainer's model chunks (per PP / virtual stage), wrap them in megatron DDP, and wire
the optimizer hooks megatron's schedules expect (Megatron-LM's ``get_model`` + ``setup_model_and_optimizer``)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any

from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.transformer.module import Float16Module
from megatron.core.utils import get_model_config

from sfpo_megatron.components.checkpoint import CheckpointError, load_checkpoint
from sfpo_megatron.components.optimizer import build_optimizer, build_scheduler
from sfpo_megatron.models.builder import build_model

log = logging.getLogger(__name__)


@dataclass
class TrainingSetup:
    model: list  # DDP-wrapped chunks (one per virtual stage)
    optimizer: Any
    scheduler: Any
    config: Any  # the TransformerConfig shared by the chunks
    arch: Any  # HFArch


def unwrap(chunk):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def build_bare_chunks(args: argparse.Namespace, arch) -> list:
    """This rank's model chunks (one per virtual stage), bf16 behind ``Float16Module``; no DDP."""
    overrides = argparse.Namespace(**vars(args))
    # Initialise the full weight on CPU then shard it: the same seed gives the same model at any TP.
    overrides.use_cpu_initialization = True
    if getattr(args, "recompute_activations", False):
        overrides.recompute_granularity = "full"
        overrides.recompute_method = "uniform"
        overrides.recompute_num_layers = 1
    vpp = args.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        model = build_model(arch.raw, overrides, vp_stage=vp_stage if vpp else None)
        for p in model.parameters():
            # megatron's TP attribute defaults (Megatron-LM's get_model does the same)
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(p)
        chunks.append(Float16Module(model.config, model) if args.bf16 else model)
    return chunks


def build_model_chunks(args: argparse.Namespace, arch) -> list:
    chunks = build_bare_chunks(args, arch)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        use_distributed_optimizer=args.use_distributed_optimizer,
        check_for_nan_in_grad=True,
        bucket_size=None,
    )
    wrapped = []
    for i, c in enumerate(chunks):
        wrapped.append(DistributedDataParallel(
            config=unwrap(c).config, ddp_config=ddp_config, module=c,
            # Only the first chunk's buckets overlap the backward of the others (Megatron-LM).
            disable_bucketing=i > 0))
    for m in wrapped:
        m.broadcast_params()
    return wrapped


def build_training_setup(args: argparse.Namespace, arch, total_scheduler_steps: int) -> TrainingSetup:
    model = build_model_chunks(args, arch)
    optimizer = build_optimizer(args, model)
    scheduler = build_scheduler(args, optimizer, total_scheduler_steps)
    config = get_model_config(model[0])
    if config.num_moe_experts and parallel_state.get_data_parallel_rank() == 0 \
            and parallel_state.get_pipeline_model_parallel_rank() == 0 \
            and parallel_state.get_tensor_model_parallel_rank() == 0:
        log.info("mixture of experts: %d experts, top-%d, expert-parallel size %d, expert-TP "
                 "size %d, %s token dispatcher, aux loss coefficient %g", config.num_moe_experts,
                 config.moe_router_topk, config.expert_model_parallel_size,
                 config.expert_tensor_parallel_size, config.moe_token_dispatcher_type,
                 config.moe_aux_loss_coeff)
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    if args.overlap_grad_reduce:
        config.no_sync_func = [m.no_sync for m in model]
        if len(model) == 1:
            config.no_sync_func = config.no_sync_func[0]
    if args.overlap_param_gather:
        config.param_sync_func = [m.start_param_sync for m in model]
        if len(model) == 1:
            config.param_sync_func = config.param_sync_func[0]
    if args.virtual_pipeline_model_parallel_size:
        # Interleaved PP on gloo gives wrong numbers silently with batched p2p (measured).
        config.batch_p2p_comm = False
    return TrainingSetup(model=model, optimizer=optimizer, scheduler=scheduler, config=config,
                         arch=arch)


def zero_grads(setup: TrainingSetup) -> None:
    for m in setup.model:
        m.zero_grad_buffer()
    setup.optimizer.zero_grad()


def count_parameters(model: list) -> int:
    return sum(p.numel() for m in model for p in m.parameters())


def build_frozen_model(args: argparse.Namespace, arch) -> list:
    """Model chunks for forward-only use (no DDP buffers, no gradients), same layout as the
    policy: this rank's PP stage(s) and TP shard, bf16 behind ``Float16Module`` like the policy."""
    chunks = build_bare_chunks(args, arch)
    for chunk in chunks:
        for p in chunk.parameters():
            p.requires_grad_(False)
    for chunk in chunks:
        chunk.eval()
    return chunks


def build_reference_model(args: argparse.Namespace, arch, load: str) -> list:
    """The frozen reference policy for ``--kl-coef`` > 0: :func:`build_frozen_model` with the
    model weights of the torch_dist checkpoint in ``load`` (e.g. the run's initial checkpoint)."""
    chunks = build_frozen_model(args, arch)
    if load_checkpoint(load, chunks, load_optim=False, load_rng=False) is None:
        raise CheckpointError(f"--ref-load {load} holds no checkpoint (the frozen reference "
                              "policy of --kl-coef)")
    return chunks
