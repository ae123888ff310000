"""The ``calculator`` tool: arithmetic evaluated over Python's ``ast`` (numbers, + - * / // %
**, unary signs, parentheses); anything else is refused, nothing is ``eval``-ed."""

from __future__ import annotations

import ast
import math
import operator
from typing import Any

from sfpo_megatron.rollout.tools.base import Tool, ToolResult

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPONENT = 64  # bounds the work a ** can ask for
MAX_DIGITS = 100  # and the size of any intermediate integer
MAX_LENGTH = 1000  # characters of one expression


class CalculatorError(ValueError):
    pass


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise CalculatorError(f"exponent {right} is larger than {MAX_EXPONENT}")
        value = _BINARY[type(node.op)](left, right)
        if isinstance(value, complex):
            raise CalculatorError("the result is not a real number")
        if isinstance(value, int) and abs(value) >= 10 ** MAX_DIGITS:
            raise CalculatorError(f"a result has more than {MAX_DIGITS} digits")
        return value
    raise CalculatorError(f"unsupported syntax: {type(node).__name__}")


def calculate(expression: str) -> str:
    """The value of ``expression`` as text (integers exact; whole floats printed as integers)."""
    if len(expression) > MAX_LENGTH:
        raise CalculatorError(f"expression longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise CalculatorError(f"invalid expression: {e.msg}") from e
    value = _eval(tree)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CalculatorError("the result is not finite")
        if value.is_integer() and abs(value) < 2 ** 53:
            return str(int(value))
        return repr(value)
    return str(value)


class Calculator(Tool):
    name = "calculator"
    argument = "expression"

    def call(self, arguments: dict[str, Any]) -> ToolResult:
        expression = arguments.get(self.argument)
        if not isinstance(expression, str):
            return ToolResult(f"error: calculator needs a string argument {self.argument!r}", error=True)
        try:
            return ToolResult(calculate(expression))
        except (CalculatorError, ArithmeticError) as e:
            return ToolResult(f"error: {type(e).__name__}: {e}" if isinstance(e, ArithmeticError)
                              else f"error: {e}", error=True)
