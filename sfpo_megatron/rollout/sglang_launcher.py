"""Start rollout engines as child processes: real SGLang on GPU nodes, or the CPU server.

One process per engine (``python -m sglang.launch_server`` or ``python -m
sfpo_megatron.cpu_server.server``), same interface either way (``--rollout-backend sglang|cpu``), so the
launch / health-wait / log / shutdown path is exercised on CPU machines too:

* engine i listens on ``host:base_port + i`` (free ports when no base port is given) and, for
  SGLang, uses GPUs ``gpu_offset + i * tp_size ...`` (``--base-gpu-id``);
* stdout and stderr go to ``log_dir/engine_<i>.log``, which is kept; a failed start quotes its tail;
* ``start()`` returns once every engine answers ``GET /health`` (or raises ``LaunchError``);
* engines are stopped (SIGTERM to their process group, then SIGKILL) by ``stop()``, at interpreter
  exit, and on SIGTERM / SIGINT of this process.

Extra SGLang flags pass through from the trainer's command line as ``--sglang-<flag> [value]``
(e.g. ``--sglang-context-length 8192`` -> ``--context-length 8192``); see ``split_sglang_args``.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import requests

from sfpo_megatron.errors import UserError

logger = logging.getLogger(__name__)

BACKENDS = ("cpu", "sglang")


class LaunchError(UserError, RuntimeError):
    """An engine did not come up; the message quotes the command and the end of its log."""


class SGLangNotInstalledError(LaunchError):
    """``--rollout-backend sglang`` without the sglang package."""


def find_free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_health(url: str, timeout_s: float, proc: subprocess.Popen | None = None, what: str = "server",
                    log_path: Path | None = None) -> None:
    """Poll ``GET url/health`` until 200; fail early when ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise LaunchError(f"{what} at {url} exited with code {proc.returncode} before becoming healthy{_tail(log_path)}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise LaunchError(f"{what} at {url} was not healthy after {timeout_s:.0f}s{_tail(log_path)}")
        time.sleep(0.25)


def _tail(log_path: Path | None, lines: int = 30) -> str:
    if log_path is None or not log_path.exists():
        return ""
    text = log_path.read_text(errors="replace").splitlines()[-lines:]
    return f"; last lines of {log_path}:\n" + "\n".join(text)


def split_sglang_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``--sglang-*`` flags out of ``argv``: (other args, flags for sglang.launch_server).

    ``--sglang-foo=v`` and ``--sglang-foo v`` become ``--foo v``; ``--sglang-flag`` followed by
    another option (or nothing) becomes the boolean ``--flag``.
    """
    rest: list[str] = []
    sglang: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--sglang-"):
            name, eq, value = arg[len("--sglang-"):].partition("=")
            if not name:
                raise ValueError(f"bad pass-through flag {arg!r}: expected --sglang-<flag>")
            sglang.append(f"--{name}")
            if eq:
                sglang.append(value)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                sglang.append(argv[i + 1])
                i += 1
        else:
            rest.append(arg)
        i += 1
    return rest, sglang


@dataclass
class LaunchConfig:
    model_path: str
    backend: str = "cpu"
    num_engines: int = 1
    tp_size: int = 1
    host: str = "127.0.0.1"
    base_port: int | None = None
    mem_fraction_static: float | None = None
    extra_args: list[str] = field(default_factory=list)  # appended to every engine's command line
    log_dir: str = "rollout_logs"
    health_timeout_s: float = 600.0
    api_key: str | None = None
    weight_version: str | None = None
    gpu_offset: int = 0
    env: dict[str, str] = field(default_factory=dict)
    # Engines get SIGKILL when the launching thread's process dies, even by SIGKILL (no atexit
    # hook runs then): `setpriv --pdeathsig KILL` (util-linux) sets the parent-death signal and
    # execs the server. The signal follows the *thread* that started the engine: start them from
    # the main thread.
    die_with_parent: bool = True

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"--rollout-backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.num_engines < 1:
            raise ValueError(f"--rollout-num-engines must be >= 1, got {self.num_engines}")
        if self.tp_size < 1:
            raise ValueError(f"--rollout-tp-size must be >= 1, got {self.tp_size}")
        if self.backend == "cpu" and self.tp_size != 1:
            raise ValueError(f"the CPU rollout server runs one process per engine: --rollout-tp-size must be 1, got {self.tp_size}")
        if self.mem_fraction_static is not None and not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(f"--rollout-mem-fraction must be in (0, 1), got {self.mem_fraction_static}")
        if self.base_port is not None and not 0 < self.base_port <= 65535 - self.num_engines:
            raise ValueError(f"--rollout-base-port {self.base_port} leaves no room for {self.num_engines} engine ports")


# Launchers still running, stopped by the atexit / signal hooks.
_ACTIVE: set[RolloutLauncher] = set()
_HOOKS_LOCK = threading.Lock()
_HOOKS_INSTALLED = False


def _stop_all() -> None:
    for launcher in list(_ACTIVE):
        launcher.stop()


def _install_hooks() -> None:
    global _HOOKS_INSTALLED
    with _HOOKS_LOCK:
        if _HOOKS_INSTALLED:
            return
        _HOOKS_INSTALLED = True
    atexit.register(_stop_all)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; atexit still applies
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: FrameType | None, _previous: Any = previous) -> None:
            _stop_all()
            if callable(_previous):
                _previous(signum, frame)
            elif _previous == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        signal.signal(sig, handler)


def die_with_parent(cmd: list[str]) -> list[str]:
    """``cmd`` behind ``setpriv --pdeathsig KILL`` on Linux (unchanged where setpriv is missing)."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", "KILL", "--", *cmd] if setpriv else cmd


class RolloutLauncher:
    def __init__(self, cfg: LaunchConfig):
        cfg.validate()
        if cfg.backend == "sglang" and importlib.util.find_spec("sglang") is None:
            raise SGLangNotInstalledError(
                f"--rollout-backend sglang needs the sglang package, which {sys.executable} cannot import. "
                "Install SGLang on the GPU nodes (see docs/gpu-validation.md) or use --rollout-backend cpu."
            )
        self.cfg = cfg
        self.processes: list[subprocess.Popen] = []
        self.urls: list[str] = []
        self.log_paths: list[Path] = []

    def build_command(self, index: int, port: int) -> list[str]:
        c = self.cfg
        if c.backend == "sglang":
            cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", c.model_path,
                   "--tp-size", str(c.tp_size), "--host", c.host, "--port", str(port),
                   "--base-gpu-id", str(c.gpu_offset + index * c.tp_size)]
            if c.mem_fraction_static is not None:
                cmd += ["--mem-fraction-static", str(c.mem_fraction_static)]
        else:
            cmd = [sys.executable, "-m", "sfpo_megatron.cpu_server.server", "--model-path", c.model_path,
                   "--host", c.host, "--port", str(port)]
            if c.mem_fraction_static is not None:
                logger.warning("--rollout-mem-fraction has no meaning for the CPU rollout server; ignored")
        if c.api_key:
            cmd += ["--api-key", c.api_key]
        if c.weight_version is not None:
            cmd += ["--weight-version", c.weight_version]
        return cmd + list(c.extra_args)

    def _ports(self) -> list[int]:
        if self.cfg.base_port is not None:
            return [self.cfg.base_port + i for i in range(self.cfg.num_engines)]
        ports: list[int] = []
        while len(ports) < self.cfg.num_engines:
            p = find_free_port(self.cfg.host)
            if p not in ports:
                ports.append(p)
        return ports

    def start(self) -> list[str]:
        """Start every engine, wait for all to be healthy, return their urls."""
        if self.processes:
            raise LaunchError("this launcher already started its engines")
        _install_hooks()
        _ACTIVE.add(self)
        log_dir = Path(self.cfg.log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.cfg.env}
        try:
            for i, port in enumerate(self._ports()):
                cmd = self.build_command(i, port)
                if self.cfg.die_with_parent:
                    cmd = die_with_parent(cmd)
                log_path = log_dir / f"engine_{i}.log"
                with open(log_path, "ab") as log:
                    log.write(f"\n==== {time.strftime('%F %T')} {' '.join(cmd)}\n".encode())
                    log.flush()
                    # Own session: stop() signals the whole group (SGLang forks schedulers).
                    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                self.processes.append(proc)
                self.log_paths.append(log_path)
                self.urls.append(f"http://{self.cfg.host}:{port}")
                logger.info("started %s engine %d (pid %d) on %s, log %s", self.cfg.backend, i, proc.pid, self.urls[-1], log_path)
            for i, (url, proc) in enumerate(zip(self.urls, self.processes)):
                wait_for_health(url, self.cfg.health_timeout_s, proc, f"{self.cfg.backend} engine {i}", self.log_paths[i])
        except BaseException:
            self.stop()
            raise
        return list(self.urls)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM each engine's process group, SIGKILL what is left after ``grace_s``."""
        for proc in self.processes:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=5)
        _ACTIVE.discard(self)

    def __enter__(self) -> RolloutLauncher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def add_launcher_args(parser: argparse.ArgumentParser) -> None:
    """The trainer's rollout flags (for ``arguments.py``); ``--sglang-*`` go through split_sglang_args."""
    g = parser.add_argument_group("rollout engines")
    g.add_argument("--rollout-backend", choices=BACKENDS, default="cpu")
    g.add_argument("--rollout-num-engines", type=int, default=1)
    g.add_argument("--rollout-tp-size", type=int, default=1)
    g.add_argument("--rollout-host", default="127.0.0.1")
    g.add_argument("--rollout-base-port", type=int, default=None)
    g.add_argument("--rollout-mem-fraction", type=float, default=None)
    g.add_argument("--rollout-log-dir", default="rollout_logs")
    g.add_argument("--rollout-health-timeout", type=float, default=600.0)
    g.add_argument("--rollout-api-key", default=None)


def launch_config_from_args(args: argparse.Namespace, model_path: str, sglang_args: Sequence[str] = ()) -> LaunchConfig:
    if sglang_args and args.rollout_backend != "sglang":
        logger.warning("ignoring SGLang pass-through flags %s: --rollout-backend is %s", list(sglang_args), args.rollout_backend)
        sglang_args = ()
    return LaunchConfig(
        model_path=model_path, backend=args.rollout_backend, num_engines=args.rollout_num_engines,
        tp_size=args.rollout_tp_size, host=args.rollout_host, base_port=args.rollout_base_port,
        mem_fraction_static=args.rollout_mem_fraction, extra_args=list(sglang_args), log_dir=args.rollout_log_dir,
        health_timeout_s=args.rollout_health_timeout, api_key=args.rollout_api_key,
    )
