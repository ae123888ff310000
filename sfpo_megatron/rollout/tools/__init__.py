"""Tools a multi-turn rollout can call (``--tool``): the interface and the built-in ones."""
