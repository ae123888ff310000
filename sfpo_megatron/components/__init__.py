"""Trainer building blocks: optimizer, checkpoints, pretraining data, metrics.

Modules are imported directly (``from sfpo_megatron.components.metrics import MetricsLogger``);
this package deliberately imports nothing so that light users do not pay megatron's import cost.
"""
