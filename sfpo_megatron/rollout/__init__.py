"""Rollout: SGLang-API client, CPU rollout server, engine launcher and weight transports.

The trainer talks to rollout engines only through SGLang's native HTTP API, so the same run uses real
SGLang on GPU nodes and ``sfpo_megatron.rollout.server`` (HF transformers on CPU) elsewhere.
Names resolve lazily, so importing the launcher or the client does not pull in torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "client": ["NoLiveServerError", "RolloutClient", "RolloutError", "RolloutRequestError", "RolloutServerError",
               "RouterUnavailableError", "Sample"],
    "sglang_launcher": ["LaunchConfig", "LaunchError", "RolloutLauncher", "SGLangNotInstalledError"],
    "transport": ["DiskTransport", "DistributedTransport", "PushStats", "RefitError", "TensorTransport",
                  "TransportUnavailableError", "iter_buckets", "make_transport"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
