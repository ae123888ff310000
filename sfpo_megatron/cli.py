"""``sfpo-megatron`` console script: ``pretrain``, ``rl``, ``eval`` subcommands.

Works as a plain command (one process), under ``torchrun`` and under ``srun`` (rank and world
from the environment).
"""

from __future__ import annotations

import logging
import os
import sys

SUBCOMMANDS = ("pretrain", "rl", "eval")


def _setup_logging() -> None:
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"[%(asctime)s r{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    import warnings

    # megatron warns at import that TE/apex are missing; the platform switch handles that.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*apex.*")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        print(f"usage: sfpo-megatron {{{','.join(SUBCOMMANDS)}}} [flags]  (-h for help)",
              file=sys.stderr)
        return 2
    _setup_logging()
    try:
        return _run(argv[0], argv[1:])
    except _user_errors() as e:
        # Bad input: one line naming the problem, not a traceback.
        print(f"sfpo-megatron {argv[0]}: error: {e}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    from sfpo_megatron.components.checkpoint import CheckpointError
    from sfpo_megatron.distributed.parallel import LayoutError
    from sfpo_megatron.models.hf_config import ParallelLayoutError, UnsupportedModelError

    return (LayoutError, CheckpointError, ParallelLayoutError, UnsupportedModelError)


def _run(cmd: str, rest: list[str]) -> int:
    if cmd == "pretrain":
        from sfpo_megatron.arguments import build_pretrain_parser
        from sfpo_megatron.distributed import parallel
        from sfpo_megatron.train.pretrain import pretrain

        args = build_pretrain_parser().parse_args(rest)
        try:
            pretrain(args)
        finally:
            parallel.destroy()
        return 0
    if cmd == "rl":
        from sfpo_megatron.rl.loop import main as rl_main

        return rl_main(rest)
    from sfpo_megatron.rl.evaluate import main as eval_main

    return eval_main(rest)


if __name__ == "__main__":  # dist_checkpointing spawns processes: keep the guard
    sys.exit(main())
