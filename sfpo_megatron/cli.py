"""``sfpo-megatron`` console script: ``pretrain``, ``rl``, ``eval`` subcommands.

Works as a plain command (one process), under ``torchrun`` and under ``srun`` (rank and world
from the environment). Bad input of any subcommand (a ``UserError``) ends here: one line naming
the problem, exit code 2.
"""

from __future__ import annotations

import logging
import os
import sys

from sfpo_megatron.arguments import build_pretrain_parser, build_rl_parser
from sfpo_megatron.components.preemption import EXIT_CODE
from sfpo_megatron.distributed import parallel
from sfpo_megatron.errors import UserError
from sfpo_megatron.rl.evaluate import run_eval
from sfpo_megatron.rl.loop import Preempted
from sfpo_megatron.rl.loop import run as run_rl
from sfpo_megatron.rollout.sglang_launcher import split_sglang_args
from sfpo_megatron.trainer.pretrain import pretrain

SUBCOMMANDS = ("pretrain", "rl", "eval")
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
        print(f"sfpo-megatron {cmd}: error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        log.warning("%s: checkpoint written, exiting with %d", e, EXIT_CODE)
        return EXIT_CODE
    finally:
        parallel.destroy()


def _run(cmd: str, rest: list[str]) -> int:
    if cmd == "pretrain":
        pretrain(build_pretrain_parser().parse_args(rest))
        return 0
    # `--sglang-*` flags go to the SGLang servers (as `--*`).
    rest, sglang_args = split_sglang_args(rest)
    parser = build_rl_parser()
    if cmd == "eval":
        parser.prog = "sfpo-megatron eval"
        run_eval(parser.parse_args(rest), sglang_args)
    else:
        run_rl(parser.parse_args(rest), sglang_args)
    return 0


if __name__ == "__main__":  # dist_checkpointing spawns processes: keep the guard
    sys.exit(main())
