"""The ``python`` tool: runs a call's code in a separate, resource-limited Python process.

What bounds the code, and who enforces it:

* **OS-enforced** (the kernel, whatever the code does): CPU time (``RLIMIT_CPU``: SIGXCPU, then
  SIGKILL), address space (``RLIMIT_AS``: allocations beyond it fail with ``MemoryError``), size
  of any file written (``RLIMIT_FSIZE``), open files (``RLIMIT_NOFILE``), no core dumps; soft
  and hard limits are equal, so the code cannot raise them. Wall time: the process group is
  killed after ``wall_s``. When unprivileged user namespaces work (``unshare -rn``, probed once),
  the process runs in a network namespace of its own with no interface up: no connection can
  leave it. The working directory is a fresh scratch directory, removed after the call.
* **Interpreter-enforced** (a ``sys.addaudithook`` hook installed before the code runs, which
  Python code cannot remove): opening a file for writing, creating, removing or renaming a path
  outside the scratch directory, socket connect / bind / DNS look-ups, starting processes
  (``subprocess``, ``os.system``, ``os.exec*``, ``os.fork``) are refused with ``PermissionError``.
  Native code (C extensions such as numpy, which loads ``ctypes``, stay importable) bypasses
  audit hooks, so this layer is a guard against a policy's accidents, not a security boundary:
  without user namespaces, network isolation is this layer only.

The tool's output is the code's stdout (cut to ``max_output_chars``); when the code fails, the
last line of its error (e.g. ``MemoryError``); a CPU or wall time-out is an output too. Nothing
runs in the calling process.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any

from sfpo_megatron.rollout.tools.base import Tool, ToolResult

# The child's entry: limits, then the audit hook, then the code (scratch dir = argv[1]).
_RUNNER = r'''
import os, resource, sys
scratch = os.path.realpath(sys.argv[1])
cpu_s, as_bytes, fsize = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for what, value in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, as_bytes),
                    (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NOFILE, 64),
                    (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(what, (value, value))
code = open(os.path.join(scratch, "main.py")).read()
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_PATHS = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
          "os.link": (0, 1), "os.symlink": (1,), "os.truncate": (0,), "os.chmod": (0,),
          "os.chown": (0,), "os.utime": (0,), "shutil.rmtree": (0,), "shutil.move": (0, 1)}
_DENY = ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
         "socket.gethostbyname", "socket.gethostbyaddr", "subprocess.Popen", "os.system", "os.exec",
         "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty")
def _inside(path):
    if isinstance(path, int):
        return True
    p = os.path.realpath(os.path.join(scratch, os.fsdecode(path)))
    return p == scratch or p.startswith(scratch + os.sep)
def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = bool((flags or 0) & _WRITE) or any(c in (mode or "") for c in "wax+")
        if writing and not _inside(path):
            raise PermissionError(f"writing outside the scratch directory is refused: {path}")
    elif event in _PATHS:
        for i in _PATHS[event]:
            if i < len(args) and args[i] is not None and not _inside(args[i]):
                raise PermissionError(f"{event} outside the scratch directory is refused: {args[i]}")
    elif event in _DENY:
        raise PermissionError(f"{event} is refused in the python tool (no network, no processes)")
sys.addaudithook(_hook)
del resource
sys.argv = ["main.py"]
exec(compile(code, "main.py", "exec"), {"__name__": "__main__"})
'''


@functools.lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """Whether ``unshare -rn`` (a user + network namespace, no privileges) works here."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    try:
        return subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


class PythonSandbox(Tool):
    name = "python"
    argument = "code"

    def __init__(self, cpu_s: int = 5, wall_s: float = 10.0, memory_mb: int = 1024,
                 max_file_mb: int = 16, max_output_chars: int = 2000,
                 network_namespace: bool | None = None) -> None:
        self.cpu_s, self.wall_s = int(cpu_s), float(wall_s)
        self.memory_bytes, self.file_bytes = int(memory_mb) << 20, int(max_file_mb) << 20
        self.max_output_chars = int(max_output_chars)
        self.network_namespace = (network_namespace_available() if network_namespace is None
                                  else network_namespace)

    def command(self, scratch: str) -> list[str]:
        cmd = [sys.executable, "-I", "-c", _RUNNER, scratch, str(self.cpu_s), str(self.memory_bytes),
               str(self.file_bytes)]
        return (["unshare", "-rn"] + cmd) if self.network_namespace else cmd

    def call(self, arguments: dict[str, Any]) -> ToolResult:
        code = arguments.get(self.argument)
        if not isinstance(code, str):
            return ToolResult(f"error: python needs a string argument {self.argument!r}", error=True)
        scratch = tempfile.mkdtemp(prefix="sfpo-python-tool-")
        try:
            with open(os.path.join(scratch, "main.py"), "w") as f:
                f.write(code)
            return self._run(scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _run(self, scratch: str) -> ToolResult:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": scratch, "LANG": "C.UTF-8"}
        proc = subprocess.Popen(self.command(scratch), cwd=scratch, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=self.wall_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return ToolResult(f"error: timed out after {self.wall_s:g} s", error=True, timed_out=True)
        stdout = out.decode("utf-8", "replace")[: self.max_output_chars]
        if proc.returncode == 0:
            return ToolResult(stdout)
        if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            return ToolResult(f"error: CPU time limit of {self.cpu_s} s exceeded", error=True, timed_out=True)
        last = _last_line(err.decode("utf-8", "replace")) or f"exit status {proc.returncode}"
        return ToolResult(f"{stdout}{last[: self.max_output_chars]}", error=True)
