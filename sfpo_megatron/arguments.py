"""Megatron-LM-style command-line flags shared by every subcommand.

Subsystems add their own groups (`add_*_args`) so one parser serves `pretrain`, `rl` and `eval`.
"""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model-config", "--hf-config", dest="model_config", required=True,
                   help="HF model directory or config.json describing the architecture")
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local")
    g.add_argument("--fp8-format", choices=["hybrid", "e4m3"], default=None,
                   help="FP8 training (needs Transformer Engine on a GPU)")
    g.add_argument("--fp8-recipe", choices=["delayed", "tensorwise", "mxfp8", "blockwise"],
                   default="delayed")
    g.add_argument("--bf16", action="store_true", help="bf16 model params, fp32 main params")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--seq-length", type=int, default=256)


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None)
    g.add_argument("--sequence-parallel", action="store_true",
                   help="needs Transformer Engine or apex norms (GPU)")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true")
    g.add_argument("--distributed-timeout-minutes", type=int, default=30)


def add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-iters", type=int, default=10)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="constant")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--recompute-activations", action="store_true",
                   help="full activation recompute of every layer")


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--load", default=None, help="checkpoint directory to resume / initialise from")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--finetune", action="store_true",
                   help="load model weights only; start at iteration 0 with fresh optimizer")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--ckpt-format", choices=["torch_dist"], default="torch_dist")
    g.add_argument("--dist-ckpt-optim-sharding", choices=["dp_reshardable", "fully_reshardable"],
                   default="fully_reshardable")


def add_logging_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--log-dir", default=None, help="where metrics.jsonl is written")
    g.add_argument("--log-interval", type=int, default=1)


def add_pretrain_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pretraining data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="indexed dataset prefixes, optionally weighted: 0.3 A 0.7 B")
    g.add_argument("--mock-data", action="store_true")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--eval-iters", type=int, default=0)
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--num-workers", type=int, default=0)
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--tokenizer-type", choices=["hf", "sentencepiece", "null"], default="null")
    g.add_argument("--tokenizer-path", default=None)


def build_pretrain_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("sfpo-megatron pretrain",
                                description="Megatron pretraining / SFT (next-token loss)")
    for add in (add_model_args, add_parallel_args, add_training_args, add_checkpoint_args,
                add_logging_args, add_pretrain_data_args):
        add(p)
    return p
