"""Fixtures the test modules share.

The plain functions behind them live in plain modules, one definition each, because worker
scripts and module-level constants use them too: tiny_models.py (the tiny HF model factory and
the tiny BPE tokenizer), launch.py (free_port, child processes, SERVER_ENV, load_module) and
hf_reference.py (HF transformers references on the rollout model). pytest puts tests/ on
sys.path (this conftest's directory), so test modules import them by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from launch import SERVER_ENV
from tiny_models import save_rollout_model

from sfpo_megatron.rollout.sglang_launcher import LaunchConfig, RolloutLauncher


@pytest.fixture(scope="module")
def rollout_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny rollout model directory (random Qwen2 + BPE tokenizer, seed 0), one per module."""
    return save_rollout_model(tmp_path_factory.mktemp("rollout_model") / "model")


@pytest.fixture(scope="module")
def rollout_server_options() -> dict[str, Any]:
    """LaunchConfig fields for ``rollout_server`` beyond the defaults; a test module overrides
    this fixture to change them (engines, API key, server flags, ...)."""
    return {}


@pytest.fixture(scope="module")
def rollout_server(rollout_model: Path, rollout_server_options: dict[str, Any]) -> Any:
    """CPU rollout server process(es) (``python -m sfpo_megatron.cpu_server.server``, started by
    the project's RolloutLauncher) serving ``rollout_model`` on 127.0.0.1; ``.urls`` lists them.
    Stopped when the module's tests are done."""
    options = {"backend": "cpu", "log_dir": str(rollout_model.parent / "logs"), "env": SERVER_ENV,
               **rollout_server_options}
    with RolloutLauncher(LaunchConfig(model_path=str(rollout_model), **options)) as launched:
        yield launched
