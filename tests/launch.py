"""Test helpers: real multi-process launches (torchrun, the console script) and tiny HF configs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(cmd: list[str], timeout: float = 300, check: bool = True, cwd=None,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command; on failure raise with its output so the test log shows the real error."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env or child_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n"
                             f"--- stderr ---\n{proc.stderr[-8000:]}")
    return proc


def torchrun(nproc: int, args: list[str], **kw) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N`` on a free port; args start with a script path or ``-m``."""
    cmd = [TORCHRUN, "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port())] + args
    return run(cmd, **kw)


def sfpo(nproc: int, subcommand: str, flags: list[str], **kw) -> subprocess.CompletedProcess:
    """The console script's module under torchrun (nproc > 1) or as a plain process."""
    if nproc == 1:
        return run([PYTHON, "-m", "sfpo_megatron.cli", subcommand] + flags, **kw)
    return torchrun(nproc, ["-m", "sfpo_megatron.cli", subcommand] + flags, **kw)


def write_tiny_config(path: Path, family: str = "qwen2", **overrides) -> Path:
    """A tiny random-architecture HF config (never downloaded) saved as ``path/config.json``."""
    import transformers

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  bos_token_id=0, eos_token_id=1)
    common.update(overrides)
    cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
           "llama": transformers.LlamaConfig}[family]
    cfg = cls(**common)
    path.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
