"""Megatron plumbing: model setup, fp32 main params, policy forward and vocab-parallel log-probs,
train-batch collation, per-trajectory gradient norms, the pretraining loop."""
