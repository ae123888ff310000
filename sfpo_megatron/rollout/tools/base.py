"""The tool interface of multi-turn rollouts.

A tool gets the parsed arguments of one call and returns a ``ToolResult``: its text output, which
the rollout appends to the trajectory as context (loss mask 0), and whether the call failed or
timed out. A tool never raises for a bad call: a failure is an output the model reads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any


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

