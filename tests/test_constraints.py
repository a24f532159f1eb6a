from __future__ import annotations

import pytest

from cotune import constraints


@pytest.mark.parametrize(
    "expr, values, expected",
    [
        ("a % (b * c) == 0", {"a": 32, "b": 8, "c": 2}, True),
        ("a % (b * c) == 0", {"a": 32, "b": 8, "c": 3}, False),
        ("1 <= a < 4", {"a": 3}, True),
        ("1 <= a < 4", {"a": 4}, False),
        ("a * b <= 64 or flag", {"a": 16, "b": 8, "flag": True}, True),
        ("a * b <= 64 and not flag", {"a": 2, "b": 8, "flag": True}, False),
        ("p != 'fp16' or a >= 2", {"p": "fp16", "a": 1}, False),
        ("2 ** a // 3 - -1", {"a": 4}, 6),
    ],
)
def test_evaluate(expr, values, expected):
    assert constraints.evaluate(expr, values) == expected


@pytest.mark.parametrize(
    "expr",
    ["__import__('os')", "a.b", "a[0]", "(lambda: 1)()", "[a for a in b]", "f'{a}'", "a if b else c", "{1: 2}"],
)
def test_rejects_anything_beyond_arithmetic(expr):
    with pytest.raises(ValueError):
        constraints.parse(expr)


def test_names_and_missing_values():
    assert constraints.names("a * (b + c) > d") == {"a", "b", "c", "d"}
    with pytest.raises(KeyError):
        constraints.evaluate("a > b", {"a": 1})
    with pytest.raises(ValueError, match="not a valid expression"):
        constraints.parse("a >")
