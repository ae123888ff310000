"""``sfpo-megatron`` console script: ``pretrain``, ``rl``, ``eval``, ``plan`` subcommands.

Works as a plain command (one process), under ``torchrun`` and under ``srun`` (rank and world
from the environment). Bad input of any subcommand (a ``UserError``) ends here: one line naming
the problem, exit code 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
from collections.abc import Callable

from sfpo_megatron.arguments import build_plan_parser, build_pretrain_parser, build_rl_parser
from sfpo_megatron.components import memory_plan
from sfpo_megatron.components.preemption import EXIT_CODE
from sfpo_megatron.distributed import parallel
from sfpo_megatron.errors import UserError
from sfpo_megatron.models.hf_config import load_hf_config, padded_vocab_size
from sfpo_megatron.rl.evaluate import run_eval
from sfpo_megatron.rl.loop import Preempted, check_context_parallel, check_offload_args, check_rl_layout
from sfpo_megatron.rl.loop import run as run_rl
from sfpo_megatron.rollout.engines import check_rollout_args
from sfpo_megatron.rollout.sglang_launcher import split_sglang_args
from sfpo_megatron.trainer.pretrain import pretrain
from sfpo_megatron.update.policy_update import check_update_args

SUBCOMMANDS = ("pretrain", "rl", "eval", "plan")
log = logging.getLogger("sfpo_megatron")


def _setup_logging() -> None:
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"[%(asctime)s r{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        print(f"usage: sfpo-megatron {{{','.join(SUBCOMMANDS)}}} [flags]  (-h for help)",
              file=sys.stderr)
        return 2
    _setup_logging()
    cmd, rest = argv[0], argv[1:]
    try:
        return _run(cmd, rest)
    except UserError as e:
        # Bad input: one line naming the problem, not a traceback.
        write_error_line(f"sfpo-megatron {cmd}: error: {e}")
        return 2
    except Preempted as e:
        log.warning("%s: checkpoint written, exiting with %d", e, EXIT_CODE)
        return EXIT_CODE
    finally:
        parallel.destroy()


def write_error_line(line: str) -> None:
    """One write of the whole line: torchrun's ranks share stderr, and pieces would interleave."""
    try:
        sys.stderr.flush()
        os.write(sys.stderr.fileno(), (line + "\n").encode())
    except (AttributeError, OSError, ValueError):  # a stderr without a file descriptor
        sys.stderr.write(line + "\n")


def run_tool(prog: str, main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """A tool's ``main`` (tools/*.py) as a command: bad input (a ``UserError``: unsupported model,
    parallel layout, corrupt or missing checkpoint files; or a missing file) ends as one line
    ``PROG: error: ...`` and exit code 2, like argparse's own errors; bugs keep their traceback."""
    try:
        main(argv)
    except (UserError, FileNotFoundError) as e:
        write_error_line(f"{prog}: error: {e}")
        return 2
    finally:
        parallel.destroy()
    return 0


def _run(cmd: str, rest: list[str]) -> int:
    if cmd == "pretrain":
        pretrain(build_pretrain_parser().parse_args(rest))
        return 0
    if cmd == "plan":
        return run_plan(build_plan_parser().parse_args(rest))
    # `--sglang-*` flags go to the SGLang servers (as `--*`).
    rest, sglang_args = split_sglang_args(rest)
    parser = build_rl_parser()
    if cmd == "eval":
        parser.prog = "sfpo-megatron eval"
        run_eval(parser.parse_args(rest), sglang_args)
    else:
        run_rl(parser.parse_args(rest), sglang_args)
    return 0


# ---- sfpo-megatron plan -----------------------------------------------------------------------


def plan_layout(args: argparse.Namespace, arch) -> tuple[memory_plan.ModelShape, memory_plan.Layout]:
    """The job ``args`` describes on ``--gpus`` GPUs, after ``rl``'s own start-up checks (their
    errors, word for word)."""
    args = copy.copy(args)
    if args.gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {args.gpus}")
    check_update_args(args)
    check_rollout_args(args)
    check_context_parallel(args)
    check_offload_args(args)
    if args.context_parallel_size > 1:
        raise UserError(f"sfpo-megatron plan does not model context parallelism yet "
                        f"(--context-parallel-size {args.context_parallel_size}): plan the layout "
                        "with --context-parallel-size 1 and the micro-batch's tokens divided by it")
    dp = check_rl_layout(args, arch, args.gpus)
    if args.use_dynamic_batch_size:
        tokens = args.max_tokens_per_gpu
    elif args.seq_length is None or args.seq_length < 1:
        raise UserError("the plan needs a micro-batch's tokens: --use-dynamic-batch-size "
                        "--max-tokens-per-gpu N, or --seq-length N (prompt + response tokens, "
                        "times --micro-batch-size)")
    else:
        tokens = args.micro_batch_size * args.seq_length
    tp = args.tensor_model_parallel_size
    shape = memory_plan.ModelShape.from_arch(
        arch, padded_vocab_size(arch.vocab_size, args.make_vocab_size_divisible_by, tp))
    layout = memory_plan.Layout(
        tp=tp, pp=args.pipeline_model_parallel_size, dp=dp,
        vpp=args.virtual_pipeline_model_parallel_size,
        ep=getattr(args, "expert_model_parallel_size", 1),
        etp=getattr(args, "expert_tensor_parallel_size", None),
        distributed_optimizer=args.use_distributed_optimizer, bf16=args.bf16,
        recompute=args.recompute_activations, tokens=tokens,
        sfpo=args.algorithm == "sfpo" and args.sfpo_alpha > 0,
        snapshot_offload=args.sfpo_snapshot_offload, optimizer_offload=args.optimizer_cpu_offload,
        refit_buffer=args.update_weight_buffer_size)
    return shape, layout


def search_layouts(args: argparse.Namespace, arch, gpu_memory: int) -> list[dict]:
    """Every TP x PP (no virtual stages) on ``--gpus`` GPUs that ``rl`` accepts and that fits,
    fewest model-parallel ranks first."""
    found = []
    n = args.gpus
    for tp in (d for d in range(1, n + 1) if n % d == 0):
        for pp in (d for d in range(1, n // tp + 1) if (n // tp) % d == 0):
            trial = copy.copy(args)
            trial.tensor_model_parallel_size, trial.pipeline_model_parallel_size = tp, pp
            trial.virtual_pipeline_model_parallel_size = None
            try:
                shape, layout = plan_layout(trial, arch)
            except UserError:
                continue  # a layout rl refuses
            v = memory_plan.verdict(memory_plan.plan(shape, layout), gpu_memory)
            if v.fits:
                found.append({"tp": tp, "pp": pp, "dp": layout.dp, "worst_stage": v.worst_stage,
                              "worst_total": v.worst_total, "margin": v.margin})
    return sorted(found, key=lambda r: (r["tp"] * r["pp"], r["tp"], r["pp"]))


def run_plan(args: argparse.Namespace) -> int:
    try:
        gpu_memory = memory_plan.parse_bytes(args.gpu_memory)
    except ValueError as e:
        raise UserError(f"--gpu-memory: {e}") from None
    arch = load_hf_config(args.model_config)  # refuses MoE and other unsupported model types
    if args.search:
        rows = search_layouts(args, arch, gpu_memory)
        if args.json:
            print(json.dumps({"gpus": args.gpus, "gpu_memory": gpu_memory, "layouts": rows}))
        elif not rows:
            print(f"no TP x PP x DP layout on {args.gpus} GPUs fits in "
                  f"{memory_plan.gib(gpu_memory)} GiB")
        else:
            print(f"{'TP':>3} {'PP':>3} {'DP':>3}  {'worst rank GiB':>14}  {'left GiB':>9}")
            for r in rows:
                print(f"{r['tp']:>3} {r['pp']:>3} {r['dp']:>3}  "
                      f"{memory_plan.gib(r['worst_total']):>14}  {memory_plan.gib(r['margin']):>9}")
        return 0
    shape, layout = plan_layout(args, arch)
    plans = memory_plan.plan(shape, layout)
    v = memory_plan.verdict(plans, gpu_memory)
    if args.json:
        print(json.dumps(memory_plan.to_json(shape, layout, plans, v)))
    else:
        print(memory_plan.format_table(layout, plans, v))
    return 0


if __name__ == "__main__":  # dist_checkpointing spawns processes: keep the guard
    sys.exit(main())
