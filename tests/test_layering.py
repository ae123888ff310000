"""The package's layering contract (import-linter, configured in pyproject.toml) holds, and it
catches an upward import planted in a copy of the package."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from launch import REPO, child_env

LINT = str(Path(sys.executable).with_name("lint-imports"))


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, timeout=300, env=child_env(PYTHONPATH=str(root)))


def test_the_package_keeps_its_layers() -> None:
    proc = lint(REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Contracts: 4 kept, 0 broken." in proc.stdout


def test_a_planted_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    shutil.copytree(REPO / "sfpo_megatron", tmp_path / "sfpo_megatron",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    train_batch = tmp_path / "sfpo_megatron" / "trainer" / "train_batch.py"
    # The trainer layer reaching up into the run's orchestration.
    train_batch.write_text(train_batch.read_text() + "\nfrom sfpo_megatron.rl import state  # noqa: E402,F401\n")
    # The memory planner reaching for torch (it is arithmetic on the model's shape).
    plan = tmp_path / "sfpo_megatron" / "components" / "memory_plan.py"
    plan.write_text(plan.read_text() + "\nimport torch  # noqa: E402,F401\n")
    proc = lint(tmp_path)
    assert proc.returncode != 0
    assert "Contracts: 2 kept, 2 broken." in proc.stdout
    report = " ".join(proc.stdout.split())
    assert "update | rollout > trainer > building blocks BROKEN" in report
    assert "sfpo_megatron.trainer.train_batch -> sfpo_megatron.rl.state" in report
    assert "The memory planner is arithmetic: no megatron, no torch BROKEN" in report
    assert "sfpo_megatron.components.memory_plan -> torch" in report
