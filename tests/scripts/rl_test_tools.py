"""A user tool for the multi-turn tests (``--tool rl_test_tools:Reverse``)."""

from __future__ import annotations

from typing import Any

from sfpo_megatron.rollout.tools.base import Tool, ToolResult


class Reverse(Tool):
    """Its output is its input backwards: tells a user tool's output from the built-in ones'."""

    name = "reverse"
    argument = "text"

    def call(self, arguments: dict[str, Any]) -> ToolResult:
        return ToolResult(str(arguments.get(self.argument, ""))[::-1])
