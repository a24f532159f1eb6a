"""Constraint expressions from the YAML, checked without ``eval``.

An expression is parsed with :mod:`ast` and only a small arithmetic / comparison /
boolean subset is allowed, over names that are knobs, derived values or workload
fields. Example: ``global_batch_size % (micro_batch_size * dp) == 0``.
"""

from __future__ import annotations

import ast
import operator
from typing import Any

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_CMPOPS = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}


def parse(expr: str) -> ast.Expression:
    """Parse and check that only the allowed subset is used; ``ValueError`` says what is not."""
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"{expr!r} is not a valid expression ({e.msg})") from None
    for node in ast.walk(tree):
        ok = isinstance(
            node,
            (
                ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Name,
                ast.Constant, ast.Load, ast.And, ast.Or, *_BINOPS, *_CMPOPS, *_UNARY,
            ),
        )
        if not ok:
            raise ValueError(
                f"{expr!r} uses {type(node).__name__}, but only arithmetic (+ - * / // % **), "
                "comparisons, and/or/not, numbers and knob names are allowed"
            )
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, bool, str)):
            raise ValueError(f"{expr!r}: constant {node.value!r} is not a number, bool or string")
    return tree


def names(expr: str) -> set[str]:
    """The variable names an expression reads."""
    return {n.id for n in ast.walk(parse(expr)) if isinstance(n, ast.Name)}


def evaluate(expr: str, values: dict[str, Any]) -> Any:
    """Evaluate ``expr`` over ``values``; a name missing from ``values`` is a ``KeyError``."""
    return _eval(parse(expr).body, values)


def _eval(node: ast.AST, values: dict[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return values[node.id]
    if isinstance(node, ast.BinOp):
        return _BINOPS[type(node.op)](_eval(node.left, values), _eval(node.right, values))
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_eval(node.operand, values))
    if isinstance(node, ast.BoolOp):
        results = (_eval(v, values) for v in node.values)
        return all(results) if isinstance(node.op, ast.And) else any(results)
    if isinstance(node, ast.Compare):
        left = _eval(node.left, values)
        for op, right_node in zip(node.ops, node.comparators):
            right = _eval(right_node, values)
            if not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True
    raise AssertionError(f"unreachable: {type(node).__name__} passed parse()")
