"""sfpo-megatron: SFPO / GRPO / VCPO reinforcement learning for LLM reasoning on megatron-core."""

import logging
import warnings

# megatron-core warns at import that Transformer Engine / apex are missing and it falls back to
# torch: expected on CPU (the platform switch handles it); TE is asked for explicitly on GPUs.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine and Apex are|Apex is) not installed.*")

# megatron-FSDP (unused here) logs three INFO lines at import, on every start.
logging.getLogger("megatron.core.distributed.fsdp").setLevel(logging.WARNING)

__version__ = "0.1.0"
