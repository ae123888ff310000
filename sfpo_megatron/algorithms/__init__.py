"""RL algorithm math on plain torch tensors (no parallel state): advantages, policy losses, the
SFPO α schedule, VCPO's importance weights / ESS / optimal baseline."""
