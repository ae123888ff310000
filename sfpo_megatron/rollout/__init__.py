"""The trainer's side of rollout: generate-and-score, the asynchronous producer, the SGLang-API
client, engine lifecycle, weight transports and refit. The CPU server is ``cpu_server/``."""
