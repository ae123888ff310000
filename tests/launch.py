"""Test helpers: real multi-process launches (torchrun, the console script, the project's scripts)
and loading a script's module into the test process."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import psutil

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
SCRIPTS = REPO / "tests" / "scripts"
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
# The environment of CPU rollout server processes: one thread each, no tokenizer thread pool.
SERVER_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


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


def sigkill_when(proc: subprocess.Popen, ready: Callable[[], bool], what: str, poll_s: float = 0.05,
                 timeout: float = 600) -> None:
    """SIGKILL ``proc`` and its whole process tree (servers, reward workers) as soon as
    ``ready()``; fail if the run ends first or ``what`` does not happen within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"run ended (code {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(poll_s)
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    proc.wait(timeout=60)
    for p in psutil.wait_procs(children, timeout=30)[1]:
        p.kill()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def load_module(path: Path) -> ModuleType:
    """The Python file ``path`` (a tool in tools/, a script in tests/scripts/) imported into this
    process without changing sys.path, once; registered in sys.modules under its file name, as
    process pools pickle its functions by module name."""
    name = Path(path).stem
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    elif Path(module.__file__ or "") != Path(path):
        raise ImportError(f"module {name!r} is already {module.__file__}, not {path}")
    return module
