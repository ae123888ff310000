"""Orchestration: the ``rl`` run loop, the run state its checkpoints carry, and evaluation."""
