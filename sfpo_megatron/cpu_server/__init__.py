"""The CPU rollout server with SGLang's HTTP API (a separate process; never imported by the trainer)."""
