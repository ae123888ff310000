"""Rollout: SGLang-API client, CPU rollout server, engine launcher and weight transports.

The trainer talks to rollout engines only through SGLang's native HTTP API, so the same run uses real
SGLang on GPU nodes and ``sfpo_megatron.rollout.server`` (HF transformers on CPU) elsewhere.
Heavy modules (the server imports transformers) are not imported here.
"""

from sfpo_megatron.rollout.client import (
    NoLiveServerError,
    RolloutClient,
    RolloutError,
    RolloutRequestError,
    RolloutServerError,
    RouterUnavailableError,
    Sample,
)
from sfpo_megatron.rollout.sglang_launcher import LaunchConfig, LaunchError, RolloutLauncher, SGLangNotInstalledError
from sfpo_megatron.rollout.transport import (
    DiskTransport,
    DistributedTransport,
    PushStats,
    RefitError,
    TensorTransport,
    TransportUnavailableError,
    iter_buckets,
    make_transport,
)

__all__ = [
    "DiskTransport", "DistributedTransport", "LaunchConfig", "LaunchError", "NoLiveServerError", "PushStats",
    "RefitError", "RolloutClient", "RolloutError", "RolloutLauncher", "RolloutRequestError", "RolloutServerError",
    "RouterUnavailableError", "SGLangNotInstalledError", "Sample", "TensorTransport", "TransportUnavailableError",
    "iter_buckets", "make_transport",
]
