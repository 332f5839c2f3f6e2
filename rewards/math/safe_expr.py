"""Parse a plain-text expression such as ``sqrt(2)/2`` or ``3*x**2 + 1`` without trusting it.

sympy's ``parse_expr`` ends in ``eval``, so model text reaches it only after Python's own
tokenizer has shown that every token is a number, an operator, a bracket, or a name on a short
whitelist; no attribute access, strings, keywords or dunders can get through.
"""

from __future__ import annotations

import io
import re
import tokenize
from typing import Any

_FUNCTIONS = {
    "sqrt", "exp", "log", "ln", "sin", "cos", "tan", "cot", "sec", "csc",
    "asin", "acos", "atan", "pi", "E", "I", "oo", "factorial", "binomial", "Abs",
}  # fmt: skip
_OPERATORS = {"+", "-", "*", "/", "**", "^", "(", ")", ",", "!"}
_NAME = re.compile(r"[A-Za-z]\Z")  # single-letter variables only
_PLAIN_HINT = re.compile(r"\*\*|\bsqrt\(|\b(?:log|ln|exp|sin|cos|tan)\(|\d\s*\*\s*[a-z(]")
_MAX_LENGTH = 300


def looks_like_plain_expression(text: str) -> bool:
    """True for ``sqrt(2)/2``-style text with no LaTeX commands (those go to the LaTeX parser)."""
    return "\\" not in text and bool(_PLAIN_HINT.search(text))


def _tokens_allowed(text: str) -> bool:
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return False
    for token in tokens:
        if token.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER):
            continue
        if token.type == tokenize.NUMBER:
            if "j" in token.string.lower() or len(token.string) > 40:
                return False
            continue
        if token.type == tokenize.OP and token.string in _OPERATORS:
            continue
        if token.type == tokenize.NAME and (
            token.string in _FUNCTIONS or _NAME.match(token.string)
        ):
            continue
        return False
    return True


def safe_parse_expr(text: str) -> Any | None:
    """A sympy expression for whitelisted plain text, or None (never raises)."""
    if len(text) > _MAX_LENGTH or not _tokens_allowed(text):
        return None
    import sympy
    from sympy.parsing.sympy_parser import (
        convert_xor,
        factorial_notation,
        implicit_multiplication,
        parse_expr,
        standard_transformations,
    )

    names = {name: getattr(sympy, name) for name in _FUNCTIONS if hasattr(sympy, name)}
    names["ln"] = sympy.log
    transformations = (
        *standard_transformations,
        convert_xor,
        factorial_notation,
        implicit_multiplication,
    )
    # Builtins are emptied so that even a whitelist bug cannot reach open() or __import__.
    global_dict: dict[str, Any] = {"__builtins__": {}, **names}
    # The constructors parse_expr's own transformations emit (never names the model wrote).
    for name in ("Integer", "Float", "Rational", "Symbol", "Add", "Mul", "Pow", "factorial"):
        global_dict[name] = getattr(sympy, name)
    try:
        return parse_expr(
            text,
            local_dict={},
            global_dict=global_dict,
            transformations=transformations,
            evaluate=False,
        )
    except Exception:
        return None
