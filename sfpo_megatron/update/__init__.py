"""The SFPO / GRPO policy update on one rollout batch and its off-policy (VCPO) correction."""
