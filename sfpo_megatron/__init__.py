"""sfpo-megatron: SFPO / GRPO / VCPO reinforcement learning for LLM reasoning on megatron-core."""

__version__ = "0.1.0"
