"""Megatron-style pretraining / SFT loop: next-token loss on an indexed token dataset.

The RL loop reuses its pieces (model setup, forward/backward through megatron's schedules,
checkpoints, metrics).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import time
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from sfpo_megatron.components.checkpoint import load_checkpoint, resolve_load_dir, save_checkpoint
from sfpo_megatron.components.metrics import MetricsLogger, ThroughputMeter, memory_stats
from sfpo_megatron.components.optimizer import optimizer_state_bytes
from sfpo_megatron.components.preemption import EXIT_CODE, PreemptionHandler
from sfpo_megatron.components.pretrain_data import (
    DatasetTokenizer,
    build_pretrain_data_iterators,
    check_eval_flags,
    get_batch,
)
from sfpo_megatron.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    load_tokenizer,
)
from sfpo_megatron.distributed import parallel
from sfpo_megatron.distributed.platform import current_platform, setup_platform
from sfpo_megatron.models.hf_config import load_hf_config
from sfpo_megatron.trainer.model_setup import build_training_setup, unwrap, zero_grads

log = logging.getLogger("sfpo_megatron.pretrain")


class Preempted(SystemExit):
    """Raised after the checkpoint that a SIGTERM asked for; exits with 143."""

    def __init__(self, iteration: int) -> None:
        super().__init__(EXIT_CODE)
        self.iteration = iteration


def check_args(args: argparse.Namespace, arch, world_size: int) -> int:
    """Layout and batch checks before anything is built; returns the data-parallel size."""
    tp, etp = args.tensor_model_parallel_size, args.expert_tensor_parallel_size
    if arch.is_moe and tp > 1 and not args.sequence_parallel:
        raise parallel.LayoutError(
            f"tensor-model-parallel-size {tp} with a mixture-of-experts model needs "
            "--sequence-parallel (megatron's MoE layers refuse to train without it)")
    if arch.is_moe and etp is not None and etp > tp:
        # measured: the expert gradients then differ from the expert-TP = TP run's
        raise parallel.LayoutError(
            f"expert-tensor-parallel-size {etp} > tensor-model-parallel-size {tp} is not "
            "supported for training")
    if args.global_batch_size is None:
        dp = world_size // max(1, args.tensor_model_parallel_size * args.pipeline_model_parallel_size
                               * getattr(args, "context_parallel_size", 1))
        args.global_batch_size = args.micro_batch_size * max(dp, 1)
    dp = parallel.check_layout(
        world_size=world_size, tp=args.tensor_model_parallel_size,
        pp=args.pipeline_model_parallel_size, vpp=args.virtual_pipeline_model_parallel_size,
        num_layers=arch.num_layers, num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads, micro_batch_size=args.micro_batch_size,
        global_batch_size=args.global_batch_size, cp=getattr(args, "context_parallel_size", 1),
        ep=args.expert_model_parallel_size, etp=args.expert_tensor_parallel_size,
        num_experts=arch.num_experts)
    if args.sequence_parallel and args.transformer_impl != "transformer_engine":
        raise parallel.LayoutError("--sequence-parallel needs --transformer-impl "
                                   "transformer_engine (megatron's torch norms refuse it)")
    if args.virtual_pipeline_model_parallel_size and args.pipeline_model_parallel_size < 2:
        raise parallel.LayoutError("--virtual-pipeline-model-parallel-size needs "
                                   "--pipeline-model-parallel-size >= 2")
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        args.sequence_parallel = False
    return dp


def build_tokenizer(args: argparse.Namespace, arch):
    """The tokenizer of the data: ``--tokenizer-type null`` is the model's vocabulary and EOS;
    ``hf`` / ``sentencepiece`` load ``--tokenizer-path``, which must be of that kind."""
    if args.tokenizer_type == "null":
        if args.tokenizer_path is not None:
            raise TokenizerError(f"--tokenizer-path {args.tokenizer_path} needs --tokenizer-type hf or "
                                 "sentencepiece (--tokenizer-type null uses the model's vocabulary and EOS)")
        eos = arch.raw.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos
        return DatasetTokenizer(vocab_size=arch.vocab_size, eod=int(eos or 0), name="null")
    if args.tokenizer_path is None:
        raise TokenizerError(f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-path")
    tokenizer = load_tokenizer(args.tokenizer_path)
    kind = {HFTokenizer: "hf", SentencePieceTokenizer: "sentencepiece"}[type(tokenizer)]
    if kind != args.tokenizer_type:
        what = {"hf": "an HF tokenizer", "sentencepiece": "a SentencePiece model"}[kind]
        raise TokenizerError(f"--tokenizer-type {args.tokenizer_type}, but --tokenizer-path "
                             f"{args.tokenizer_path} is {what}")
    return tokenizer


def lm_loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Per-token loss sum and token count: megatron divides by the global token count
    (``calculate_per_token_loss``), so any micro-batch / DP split gives the same gradient."""
    losses = output.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    reporting = torch.stack([loss_sum.detach(), num_tokens.float()])
    return loss_sum, num_tokens, {"lm loss": reporting}


def forward_step(data_iterator, model):
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator, current_platform().device())
    output = model(tokens, position_ids, attention_mask, labels=labels)
    return output, partial(lm_loss_func, loss_mask)


def sum_lm_loss(losses: list[dict]) -> torch.Tensor:
    """[masked CE sum, loss tokens] of this rank's micro-batches (zeros off the last stage)."""
    total = torch.zeros(2, dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for d in losses:
            total += d["lm loss"].double().cpu()
    return total


def mean_lm_loss(total: torch.Tensor) -> float:
    """Token-mean loss of [loss sum, tokens] summed over all DP ranks, known on every rank."""
    total = total.to(current_platform().device())
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        dist.all_reduce(total, group=ps.get_data_parallel_group())
    # The loss lives on the last stage; share it with the whole pipeline.
    last = ps.get_pipeline_model_parallel_last_rank()
    dist.broadcast(total, src=last, group=ps.get_pipeline_model_parallel_group())
    return (total[0] / total[1].clamp(min=1)).item()


def reduce_lm_loss(losses: list[dict]) -> float:
    """Token-mean loss over all micro-batches and DP ranks, known on every rank."""
    return mean_lm_loss(sum_lm_loss(losses))


def chunk_iterators(data_iterator, num_chunks: int):
    """The data iterator the schedule takes: interleaved pipelines run every micro-batch through
    each model chunk, and each chunk's forward step reads it, so every chunk needs its own
    iterator over the same micro-batches (one shared iterator would hand chunk 1 the micro-batch
    after chunk 0's)."""
    return data_iterator if num_chunks == 1 else list(itertools.tee(data_iterator, num_chunks))


def train_step(setup, data_iterator, num_microbatches: int, args) -> tuple[float, float]:
    zero_grads(setup)
    fb = get_forward_backward_func()
    iters = chunk_iterators(data_iterator, len(setup.model))
    losses = fb(forward_step_func=forward_step, data_iterator=iters,
                model=setup.model if len(setup.model) > 1 else setup.model[0],
                num_microbatches=num_microbatches, seq_length=args.seq_length,
                micro_batch_size=args.micro_batch_size, forward_only=False)
    ok, grad_norm, _ = setup.optimizer.step()
    if not ok:
        raise FloatingPointError("optimizer step skipped (non-finite gradients)")
    setup.scheduler.step(increment=1)
    return reduce_lm_loss(losses), float(grad_norm or 0.0)


def evaluate(setup, valid_iterator, num_microbatches: int, args) -> float:
    """Validation loss, as Megatron-LM's `evaluate`: eval_iters forward-only rounds of one global
    batch each (no gradients, model in eval mode), token-mean over all of them and all DP ranks."""
    fb = get_forward_backward_func()
    total = torch.zeros(2, dtype=torch.float64)
    for m in setup.model:
        m.eval()
    try:
        with torch.no_grad():
            for _ in range(args.eval_iters):
                losses = fb(forward_step_func=forward_step,
                            data_iterator=chunk_iterators(valid_iterator, len(setup.model)),
                            model=setup.model if len(setup.model) > 1 else setup.model[0],
                            num_microbatches=num_microbatches, seq_length=args.seq_length,
                            micro_batch_size=args.micro_batch_size, forward_only=True)
                total += sum_lm_loss(losses)
    finally:
        for m in setup.model:
            m.train()
    return mean_lm_loss(total)


def pretrain(args: argparse.Namespace) -> dict:
    """Runs the loop; returns the last iteration's metrics (used by tests and benchmarks)."""
    setup_platform()
    arch = load_hf_config(args.model_config)
    env = parallel.read_dist_env()
    check_args(args, arch, env.world_size)
    check_eval_flags(args)  # pretraining's validation flags (rl's --eval-interval is its own)
    tokenizer = build_tokenizer(args, arch)  # before any process group: a bad flag stops here
    parallel.initialize(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                        vpp=args.virtual_pipeline_model_parallel_size, seed=args.seed,
                        timeout_minutes=args.distributed_timeout_minutes,
                        ep=args.expert_model_parallel_size, etp=args.expert_tensor_parallel_size)
    args.calculate_per_token_loss = True
    setup = build_training_setup(args, arch, total_scheduler_steps=args.train_iters)
    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    if dist.get_rank() == 0:
        log.info("transformer layers per model chunk on rank 0: %s",
                 [[layer.layer_number for layer in unwrap(c).decoder.layers] for c in setup.model])

    iteration, extra = 0, {}
    if args.save and resolve_load_dir(args.save) is not None:
        # A run restarted with the same command line (crash, preemption, requeue) continues
        # its own progress in --save; --load only initialises a fresh run (as `rl` does).
        res = load_checkpoint(args.save, setup.model, setup.optimizer, setup.scheduler)
        iteration, extra = res.iteration, res.extra_state
        if args.load and os.path.abspath(args.load) != os.path.abspath(args.save):
            log.info("resuming from --save %s (iteration %d); --load %s is not used", args.save,
                     iteration, args.load)
    elif args.load:
        res = load_checkpoint(args.load, setup.model, setup.optimizer, setup.scheduler,
                              load_optim=not (args.finetune or args.no_load_optim),
                              load_rng=not (args.finetune or args.no_load_rng))
        if res is not None and not args.finetune:
            iteration, extra = res.iteration, res.extra_state
    consumed = int(extra.get("consumed_samples", iteration * args.global_batch_size))
    # Validation samples scored by the evaluations so far (Megatron-LM's consumed_valid_samples):
    # a resumed run's evaluations read on where the original's would have.
    consumed_valid = int(extra.get("consumed_valid_samples", 0))

    train_iter, valid_iter = build_pretrain_data_iterators(args, tokenizer, consumed, dp_rank, dp_size,
                                                           consumed_valid_samples=consumed_valid)
    num_microbatches = args.global_batch_size // (args.micro_batch_size * dp_size)
    metrics = MetricsLogger(args.log_dir, args.tensorboard_dir, rank=dist.get_rank(),
                            start_iteration=iteration + 1)
    meter = ThroughputMeter()
    preemption = PreemptionHandler().install()
    last: dict = {}
    try:
        while iteration < args.train_iters:
            meter.start()
            t0 = time.perf_counter()
            loss, grad_norm = train_step(setup, train_iter, num_microbatches, args)
            iteration += 1
            consumed += args.global_batch_size
            tokens = args.global_batch_size * args.seq_length
            last = {"lm_loss": loss, "grad_norm": grad_norm,
                    "lr": setup.optimizer.param_groups[0]["lr"],
                    "tokens_per_second": meter.tokens_per_second(tokens),
                    "iteration_time_s": time.perf_counter() - t0,
                    "consumed_samples": consumed, **memory_stats(current_platform().device())}
            stop = preemption.should_stop()
            if args.overlap_param_gather:
                # megatron defers the post-step all-gather to the next forward; a checkpoint,
                # the evaluation (or the caller) must see this step's weights.
                for m in setup.model:
                    m.start_param_sync(force_sync=True)
            # Megatron-LM evaluates every --eval-interval iterations and once more at the end of
            # training; here the end's evaluation is skipped when the last iteration just had one.
            evaluated = valid_iter is not None and (
                iteration == args.train_iters
                or (args.eval_interval is not None and iteration % args.eval_interval == 0))
            if evaluated:
                val_loss = evaluate(setup, valid_iter, num_microbatches, args)
                consumed_valid += args.eval_iters * args.global_batch_size
                # Megatron-LM's perplexity: exp of the loss, clipped at exp(20).
                last.update({"validation/lm_loss": val_loss, "validation/ppl": math.exp(min(20.0, val_loss)),
                             "validation/consumed_samples": consumed_valid})
                if dist.get_rank() == 0:
                    log.info("iter %d validation loss %.6f ppl %.4f", iteration, val_loss,
                             math.exp(min(20.0, val_loss)))
            if evaluated or iteration == 1 or iteration % args.log_interval == 0:
                last.update(optimizer_state_bytes(setup.optimizer))
                metrics.log(iteration, last)
                if dist.get_rank() == 0:
                    log.info("iter %d loss %.6f grad_norm %.4f", iteration, loss, grad_norm)
            run_state = {"consumed_samples": consumed, "consumed_valid_samples": consumed_valid}
            if args.save and (stop or (args.save_interval and iteration % args.save_interval == 0)):
                # The save's helper processes must outlive a group-wide SIGTERM (preemption.py).
                with preemption.deferred():
                    save_checkpoint(args.save, iteration, setup.model, setup.optimizer,
                                    setup.scheduler, run_state,
                                    optim_sharding=args.dist_ckpt_optim_sharding)
            if stop:
                raise Preempted(iteration)
        if args.save and (not args.save_interval or iteration % args.save_interval != 0):
            with preemption.deferred():
                save_checkpoint(args.save, iteration, setup.model, setup.optimizer, setup.scheduler,
                                {"consumed_samples": consumed, "consumed_valid_samples": consumed_valid},
                                optim_sharding=args.dist_ckpt_optim_sharding)
    finally:
        metrics.close()
        preemption.uninstall()
    return last
