"""The ``calculator`` tool's arithmetic: exact values of plain-text expressions, run in a math
checker worker (rewards/math/pool.py), where a call that would never end (``9^9^9^9``) is
killed at its deadline.

Text is read by :func:`rewards.math.safe_expr.safe_parse_expr` (Python's tokenizer vets every
token against a whitelist; nothing is ``eval``-ed), decimals become exact fractions, and sympy
evaluates: integers and fractions exactly, other numbers exactly and to 15 significant digits,
expressions with variables simplified.
"""

from __future__ import annotations

READABLE = (
    "numbers, + - * / ^ (or **), parentheses, sqrt, exp, log, sin, cos, tan, pi, E, "
    "and one-letter variables"
)


def calculate(text: str) -> str:
    """The value of ``text``, as the tool's result; ValueError saying why there is none."""
    import sympy

    from rewards.math.safe_expr import safe_parse_expr

    cleaned = text.strip().replace("×", "*").replace("÷", "/").replace("−", "-").rstrip("=")
    expression = safe_parse_expr(cleaned) if cleaned else None
    if expression is None:
        raise ValueError(f"cannot read {text[:200]!r} as arithmetic; use {READABLE}")
    exact = expression.xreplace({f: sympy.Rational(str(f)) for f in expression.atoms(sympy.Float)})
    value = exact.doit()
    if value.has(sympy.zoo, sympy.nan) or value == sympy.oo or value == -sympy.oo:
        raise ValueError(f"{cleaned} is undefined (a division by zero?)")
    if value.is_Integer:
        return str(value)
    if value.is_Rational:
        return f"{value} = {_decimal(value)}"
    if value.is_number:
        return f"{value} = {_decimal(value)}" if value.is_real else str(sympy.nsimplify(value))
    return str(sympy.simplify(value))


def _decimal(value) -> str:
    """15 significant digits, without trailing zeros (7/2 -> 3.5)."""
    import sympy

    text = sympy.sstr(sympy.N(value, 15))
    if "." in text and "e" not in text:
        text = text.rstrip("0").rstrip(".")
    return text
