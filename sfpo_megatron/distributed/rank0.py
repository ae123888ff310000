"""Work that only global rank 0 does (HTTP, reward workers), made safe for the other ranks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from sfpo_megatron.errors import UserError

T = TypeVar("T")


class RankZeroError(UserError, RuntimeError):
    """Raised on the other trainer ranks when work that only global rank 0 does failed there."""


def rank() -> int:
    """This process's global rank (0 outside torch.distributed)."""
    return dist.get_rank() if dist.is_initialized() else 0


def on_rank0(fn: Callable[[], T]) -> T:
    """Run ``fn`` on global rank 0 and give its result to every trainer rank (collective).

    The result travels with ``broadcast_object_list`` (pickle between trainer ranks only, never
    socket data). If ``fn`` raises, rank 0 re-raises it and the other ranks raise
    ``RankZeroError`` naming it, so no rank waits forever in the next collective.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    box: list[Any] = [None]
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the others are told
            error = e
            box[0] = ("error", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status != "ok":
        raise RankZeroError(f"global rank 0 failed: {value}")
    return value
