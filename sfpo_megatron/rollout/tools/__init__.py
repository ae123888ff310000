"""Tools a multi-turn rollout can call (``--tool``): the interface (``base.py``), the built-in
ones, and ``--tool NAME`` → a tool."""

from __future__ import annotations

import importlib
from typing import Any

from sfpo_megatron.errors import UserError
from sfpo_megatron.rollout.tools.base import Tool
from sfpo_megatron.rollout.tools.calculator import Calculator
from sfpo_megatron.rollout.tools.python_sandbox import PythonSandbox


def load_tool(spec: str, **options: Any) -> Tool:
    """``python`` | ``calculator`` | ``pkg.module:ClassName`` (a ``Tool`` subclass, built with
    no arguments)."""
    if spec == "python":
        return PythonSandbox(**options)
    if spec == "calculator":
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
