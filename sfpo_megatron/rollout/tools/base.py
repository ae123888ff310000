"""The tool interface of multi-turn rollouts and ``--tool NAME`` → a tool.

A tool gets the parsed arguments of one call and returns a ``ToolResult``: its text output, which
the rollout appends to the trajectory as context (loss mask 0), and whether the call failed or
timed out. A tool never raises for a bad call: a failure is an output the model reads.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from sfpo_megatron.errors import UserError


@dataclass
class ToolResult:
    output: str
    error: bool = False
    timed_out: bool = False


class Tool(ABC):
    """One tool. ``argument`` names the argument a raw (non-JSON) call's text is passed as
    (``<code>…</code>`` blocks): ``{argument: text}``."""

    name: str = "tool"
    argument: str = "input"

    @abstractmethod
    def call(self, arguments: dict[str, Any]) -> ToolResult: ...

    def close(self) -> None:
        """Release what the tool holds (processes, directories); called once, at the end."""


def load_tool(spec: str, **options: Any) -> Tool:
    """``python`` | ``calculator`` | ``pkg.module:ClassName`` (a ``Tool`` subclass, built with
    no arguments)."""
    if spec == "python":
        from sfpo_megatron.rollout.tools.python_sandbox import PythonSandbox

        return PythonSandbox(**options)
    if spec == "calculator":
        from sfpo_megatron.rollout.tools.calculator import Calculator

        return Calculator()
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"--tool {spec!r}: expected python, calculator or pkg.module:ToolClass")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"--tool {spec!r}: cannot import it ({type(e).__name__}: {e})") from e
    tool = obj() if isinstance(obj, type) else obj
    if not isinstance(tool, Tool):
        raise UserError(f"--tool {spec!r} is a {type(tool).__name__}, not a "
                        "sfpo_megatron.rollout.tools.base.Tool")
    return tool
