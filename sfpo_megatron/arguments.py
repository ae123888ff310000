"""Megatron-LM-style command-line flags shared by every subcommand.

Subsystems add their own groups (`add_*_args`) so one parser serves `pretrain`, `rl` and `eval`.
"""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser, rl: bool = False) -> None:
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
    g.add_argument("--moe-token-dispatcher-type", choices=["alltoall", "allgather"],
                   default="alltoall", help="MoE models: megatron's token dispatcher")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=None,
                   help="MoE models: weight of the router's load-balancing loss (default: the HF "
                        "config's router_aux_loss_coef; 0 turns it off)")
    if not rl:  # rl pads each batch to its longest prompt + response
        g.add_argument("--seq-length", type=int, default=256)


def add_parallel_args(p: argparse.ArgumentParser, rl: bool = False) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    if rl:
        g.add_argument("--context-parallel-size", type=int, default=1,
                       help="split every packed sequence over N ranks (megatron's load-balanced "
                            "chunks; needs --use-dynamic-batch-size): Transformer Engine's "
                            "attention with --transformer-impl transformer_engine, else the "
                            "local spec's attention over all-gathered keys and values")
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None)
    g.add_argument("--expert-model-parallel-size", type=int, default=1,
                   help="MoE models: split the experts over N ranks")
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                   help="MoE models: tensor-parallel size of each expert (default: "
                        "--tensor-model-parallel-size)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="needs Transformer Engine or apex norms (GPU)")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true")
    g.add_argument("--distributed-timeout-minutes", type=int, default=30)


def add_training_args(p: argparse.ArgumentParser, rl: bool = False) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    if rl:
        g.add_argument("--use-dynamic-batch-size", action="store_true",
                       help="pack each rank's share of a mini-batch into micro-batches of at most "
                            "--max-tokens-per-gpu tokens (sequences concatenated, attention and "
                            "RoPE restarting at each), balanced over the DP ranks, for every "
                            "forward and backward of the update; --micro-batch-size is unused")
        g.add_argument("--max-tokens-per-gpu", type=int, default=None, metavar="N",
                       help="token budget of a packed micro-batch (with --use-dynamic-batch-size); "
                            "a longer single sample is an error")
    if not rl:  # rl's steps are --num-rollouts, its optimizer batch the rollout batch's share
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
    if rl:
        g.add_argument("--offload-train", action="store_true",
                       help="with --colocate on GPUs: the trainer's weights, gradient buffers and "
                            "optimizer state wait in pinned host memory while the rollout servers "
                            "generate, and come back before the update (megatron-core's buffer and "
                            "optimizer offload); on a CPU machine a no-op with one log line")
        g.add_argument("--optimizer-cpu-offload", action="store_true",
                       help="with --use-distributed-optimizer on GPUs: Adam's moments and step on "
                            "the host (megatron-core's HybridDeviceOptimizer, all of the shard); "
                            "on a CPU machine a no-op with one log line")


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--load", default=None, help="checkpoint directory to resume / initialise from")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--finetune", action="store_true",
                   help="load model weights only; start at iteration 0 with fresh optimizer")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--dist-ckpt-optim-sharding", choices=["dp_reshardable", "fully_reshardable"],
                   default="fully_reshardable")


def add_logging_args(p: argparse.ArgumentParser, rl: bool = False) -> None:
    g = p.add_argument_group("logging")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--log-dir", default=None, help="where metrics.jsonl is written")
    if not rl:  # rl logs every step
        g.add_argument("--log-interval", type=int, default=1)


def add_pretrain_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pretraining data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="indexed dataset prefixes, optionally weighted: 0.3 A 0.7 B")
    g.add_argument("--mock-data", action="store_true")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--eval-iters", type=int, default=0,
                   help="validation global batches per evaluation (forward only, on the --split "
                        "validation part); > 0 evaluates at the end of training")
    g.add_argument("--eval-interval", type=int, default=None,
                   help="also evaluate every N iterations (needs --eval-iters > 0); logs "
                        "validation/lm_loss and validation/ppl")
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


# ---------------------------------------------------------------------------------------------
# RL (`sfpo-megatron rl` / `eval`)
# ---------------------------------------------------------------------------------------------


def add_rl_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("RL prompts and rewards")
    g.add_argument("--prompt-data", default=None,
                   help="JSONL / Parquet file, or rg:TASK?size=N&seed=S (reasoning-gym)")
    g.add_argument("--prompt-key", default="prompt")
    g.add_argument("--answer-key", default="answer")
    g.add_argument("--system-prompt", default=None)
    g.add_argument("--prompt-template", default=None, help="format string with {prompt}")
    g.add_argument("--no-chat-template", dest="apply_chat_template", action="store_false")
    g.add_argument("--skip-malformed", action="store_true",
                   help="skip (and count) malformed dataset rows instead of stopping")
    g.add_argument("--tokenizer-path", default=None,
                   help="HF tokenizer directory or SentencePiece .model (default: --model-config)")
    g.add_argument("--reward-fn", default="auto",
                   help="auto | math | math-reference | rg | pkg.module:func. math-reference: the "
                        "SFPO reference's scorer (last \\boxed{} only; format score for a boxed "
                        "wrong answer; evaluation counts scores < 0.95 as 0), for reproducing the "
                        "paper's numbers")
    g.add_argument("--reward-format-score", type=float, default=None,
                   help="math-reference's score of a boxed but wrong answer in training "
                        "(default 0.1, the reference's); evaluation counts it 0")
    g.add_argument("--reward-num-workers", type=int, default=2)
    g.add_argument("--reward-timeout", type=float, default=10.0)
    g.add_argument("--eval-prompt-data", nargs="*", default=[], metavar="NAME=PATH")
    g.add_argument("--n-samples-per-eval-prompt", type=int, default=1)
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-temperature", type=float, default=1.0)
    g.add_argument("--eval-top-p", type=float, default=0.7)
    g.add_argument("--eval-max-response-len", type=int, default=None)


def add_rollout_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("rollout")
    g.add_argument("--rollout-backend", choices=["cpu", "sglang", "external"], default="cpu",
                   help="cpu/sglang: the trainer launches servers; external: --rollout-urls")
    g.add_argument("--rollout-urls", nargs="*", default=[])
    g.add_argument("--rollout-num-servers", type=int, default=1)
    g.add_argument("--rollout-host", default="127.0.0.1")
    g.add_argument("--rollout-port-base", type=int, default=None)
    g.add_argument("--rollout-tp-size", type=int, default=1, help="SGLang tensor parallel size")
    g.add_argument("--rollout-device", choices=["cpu", "cuda"], default="cpu",
                   help="--rollout-backend cpu: where the CPU rollout server's model runs (cuda: "
                        "the server's current GPU; sampling stays on the host)")
    g.add_argument("--rollout-mem-fraction", type=float, default=0.8)
    g.add_argument("--rollout-batch-size", type=int, default=8, help="prompts per RL step")
    g.add_argument("--n-samples-per-prompt", type=int, default=4)
    g.add_argument("--rollout-max-response-len", type=int, default=64)
    g.add_argument("--rollout-temperature", type=float, default=1.0)
    g.add_argument("--rollout-top-p", type=float, default=1.0)
    g.add_argument("--rollout-top-k", type=int, default=-1)
    g.add_argument("--rollout-max-concurrency", type=int, default=64)
    g.add_argument("--rollout-timeout", type=float, default=600.0)
    g.add_argument("--rollout-retries", type=int, default=2)
    g.add_argument("--refit-timeout", type=float, default=120.0,
                   help="seconds one weight refit may wait on a server (each update call, a "
                        "broadcast, forming the weight-update group); a server that fails or "
                        "misses it is dropped and the run goes on with the others. Kept well "
                        "under --rollout-timeout, which must cover the longest generation: a "
                        "refit has no long tail (seconds for models that fit a node), so this "
                        "bounds what a dead server mid-refit costs. Raise it for very large "
                        "models loaded from slow disks")
    g.add_argument("--dynamic-sampling", action="store_true",
                   help="drop groups whose rewards all agree and refill the batch")
    g.add_argument("--max-resample-rounds", type=int, default=4)
    g.add_argument("--weight-transport", choices=["distributed", "disk", "tensor"],
                   default="distributed")
    g.add_argument("--update-weight-buffer-size", type=int, default=512 * 2**20,
                   help="refit bytes in flight per pipeline stage: one disk shard, or two distributed "
                        "buckets of half this size (one on the wire while the next is gathered)")
    g.add_argument("--colocate", action="store_true",
                   help="servers share the trainer's devices: release their memory while training")
    g.add_argument("--rollout-deterministic", action="store_true",
                   help="bitwise reproducible rollouts given seeds and weights (CPU server: one "
                        "sequence per forward; SGLang: --enable-deterministic-inference)")


def add_multi_turn_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-turn tool use")
    g.add_argument("--rollout-mode", choices=["single-turn", "multi-turn"], default="single-turn",
                   help="multi-turn: the model calls --tool; its output is appended as context "
                        "(loss mask 0) and generation continues")
    g.add_argument("--tool", default="python",
                   help="python (a resource-limited subprocess), calculator (safe arithmetic) or "
                        "pkg.module:ToolClass")
    g.add_argument("--max-turns", type=int, default=4,
                   help="generation turns per trajectory; a call in the last one ends it "
                        "(finish reason max_turns)")
    g.add_argument("--max-total-response-len", type=int, default=None,
                   help="response tokens per trajectory, generated and tool output together "
                        "(finish reason length); default --rollout-max-response-len, which "
                        "bounds each turn")
    g.add_argument("--tool-call-format", choices=["json", "code"], default="json",
                   help='json: <tool_call>{"name": ..., "arguments": {...}}</tool_call> (Qwen); '
                        "code: <code>...</code>, the body is the tool's one argument")
    g.add_argument("--tool-call-start", default=None, help="start marker of a call (overrides the format's)")
    g.add_argument("--tool-call-end", default=None,
                   help="end marker of a call: a stop string, and a stop token when it is one token")
    g.add_argument("--tool-response-template", default="\n<tool_response>\n{output}\n</tool_response>\n",
                   help="text the tool's output is appended in ({output}); tokenized, loss mask 0")


def add_algorithm_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("policy optimisation (SFPO / GRPO)")
    g.add_argument("--algorithm", choices=["sfpo", "grpo"], default="sfpo")
    g.add_argument("--hf-checkpoint", default=None, metavar="HF_DIR",
                   help="initialise the policy from HF safetensors (instead of a torch_dist --load)")
    g.add_argument("--num-rollouts", type=int, default=10, help="RL steps (rollout batches)")
    g.add_argument("--num-steps-per-rollout", type=int, default=1,
                   help="mini-batches (optimizer steps) per pass over a rollout batch")
    g.add_argument("--ppo-epochs", type=int, default=1, metavar="E",
                   help="GRPO: E passes over each rollout batch (verl's ppo_epochs), each of "
                        "--num-steps-per-rollout optimizer steps, all against the old log-probs "
                        "at the batch's start (the control for SFPO's K+1 passes); --algorithm "
                        "sfpo refuses E > 1: its passes are --sfpo-inner-steps fast + 1 slow")
    g.add_argument("--sfpo-inner-steps", type=int, default=3, help="K fast passes")
    g.add_argument("--sfpo-alpha", type=float, default=0.8)
    g.add_argument("--sfpo-zscore-window", type=int, default=30)
    g.add_argument("--sfpo-zscore-threshold", type=float, default=1.0)
    g.add_argument("--sfpo-zscore-two-sided", action="store_true",
                   help="trigger on |z| >= tau (the paper's text) instead of z >= tau (its code)")
    g.add_argument("--sfpo-entropy-source", choices=["global", "reference"], default="global",
                   help="the entropy series the trigger's z-score watches: global = the last "
                        "pass's token mean over the whole batch (all micro-batches and DP ranks); "
                        "reference = the SFPO reference code's: the mean of per-micro-batch token "
                        "means on DP rank 0, to reproduce when its trigger fires")
    g.add_argument("--sfpo-stop-step", type=int, default=None,
                   help="fixed switch-off step (ablation) instead of the entropy trigger")
    g.add_argument("--sfpo-no-slow-pass", action="store_true",
                   help="SFPO without Stage III (ablation): after the reposition, no slow pass; "
                        "the trigger watches the last fast pass's entropy")
    g.add_argument("--sfpo-snapshot-offload", action="store_true",
                   help="keep the theta0 snapshot of the main-param shard in host memory")
    g.add_argument("--eps-clip", type=float, default=0.2)
    g.add_argument("--eps-clip-high", type=float, default=None)
    g.add_argument("--no-ppo-clip", action="store_true",
                   help="plain ratio * advantage, no PPO clip (VCPO's objective); refused with "
                        "more than one optimizer step per rollout batch unless "
                        "--allow-unclipped-multi-step")
    g.add_argument("--allow-unclipped-multi-step", action="store_true",
                   help="run --no-ppo-clip with several optimizer steps per rollout batch "
                        "(--num-steps-per-rollout > 1, --ppo-epochs > 1 or SFPO's K+1 passes): "
                        "no trust region bounds the steps after the first")
    g.add_argument("--dual-clip-c", type=float, default=None)
    g.add_argument("--loss-agg-mode", default="token-mean",
                   choices=["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
    g.add_argument("--entropy-coef", type=float, default=0.0)
    g.add_argument("--kl-coef", type=float, default=0.0)
    g.add_argument("--kl-type", choices=["k3", "low_var_kl"], default="low_var_kl")
    g.add_argument("--ref-load", default=None,
                   help="checkpoint of the frozen reference policy for --kl-coef > 0")
    g.add_argument("--disable-std-normalization", action="store_true", help="Dr.GRPO advantages")
    g.add_argument("--advantage-eps", type=float, default=1e-6)


def add_async_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("asynchronous rollouts / VCPO (arXiv 2602.17616)")
    g.add_argument("--async-rollout", action="store_true",
                   help="generate the next rollout batches while training on the current one")
    g.add_argument("--max-staleness", type=int, default=1,
                   help="k: no sample generated more than k weight versions ago is trained on")
    g.add_argument("--async-exact-staleness", action="store_true",
                   help="reproducible schedule (with --async-rollout): batch s is generated entirely "
                        "with weight version max(0, s-1-k), so with --rollout-deterministic a run "
                        "(killed and resumed or not) is a function of its seeds. Costs speed: each "
                        "refit waits until the batch k steps ahead is finished (the trainer idles "
                        "when generation is slower, no generation overlaps a refit) and every batch "
                        "is the full k versions stale")
    g.add_argument("--vcpo", action="store_true",
                   help="variance-controlled off-policy update: sequence-level truncated IS in the "
                        "loss, ESS-scaled learning rate, optional off-policy optimal baseline")
    g.add_argument("--tis-threshold", type=float, default=8.0,
                   help="truncation C of the sequence importance weight min(w, C) (with --vcpo)")
    g.add_argument("--ess-lr-scaling", choices=["sqrt", "linear", "none"], default="sqrt",
                   help="per optimizer step lr = lr_base * min(1, rho/rho_base)^(1/2 | 1) (with --vcpo)")
    g.add_argument("--ess-rho-base", type=float, default=1.0)
    g.add_argument("--off-policy-baseline", choices=["none", "opob"], default="none",
                   help="opob: per prompt group b* = sum w^2 |g|^2 R / sum w^2 |g|^2 (with --vcpo)")
    g.add_argument("--opob-grad-norm", choices=["logit", "exact"], default="logit",
                   help="|g|^2 = |d log pi(tau) / d logits|^2 from the old-logprob forward (logit, no "
                        "backward) or over all parameters (exact, one extra forward+backward)")


def build_rl_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("sfpo-megatron rl", description="SFPO / GRPO RL training")
    add_model_args(p, rl=True)
    add_parallel_args(p, rl=True)
    add_training_args(p, rl=True)
    add_checkpoint_args(p)
    add_logging_args(p, rl=True)
    for add in (add_rl_data_args, add_rollout_args, add_multi_turn_args, add_algorithm_args, add_async_args):
        add(p)
    # Set by the loop from the rollout batch (global_batch_size) or unused (train_iters); kept as
    # attributes because the shared trainer setup reads them.
    p.set_defaults(lr=1e-6, lr_decay_style="constant", train_iters=None, global_batch_size=None)
    return p


# ---------------------------------------------------------------------------------------------
# Memory planner (`sfpo-megatron plan`)
# ---------------------------------------------------------------------------------------------


def add_plan_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("memory plan")
    g.add_argument("--gpus", type=int, required=True,
                   help="GPUs of the job (the world size): DP = N / (TP x PP)")
    g.add_argument("--gpu-memory", default="80GB",
                   help="memory of one GPU (80GB, 141GiB, 81920MB; GB = GiB)")
    g.add_argument("--seq-length", type=int, default=None,
                   help="tokens of one sample (prompt + response) without "
                        "--use-dynamic-batch-size: a micro-batch holds --micro-batch-size of them")
    g.add_argument("--json", action="store_true", help="print the plan as JSON")
    g.add_argument("--search", action="store_true",
                   help="list the layouts (TP x PP x DP on --gpus GPUs) that fit, fewest "
                        "model-parallel ranks first")


def build_plan_parser() -> argparse.ArgumentParser:
    """``rl``'s flags (the job being planned) and the planner's own."""
    p = build_rl_parser()
    p.prog = "sfpo-megatron plan"
    p.description = "per-rank GPU memory of an rl job before it is submitted (docs/memory.md)"
    add_plan_args(p)
    return p
