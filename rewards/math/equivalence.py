"""Is a predicted answer mathematically the same as the gold one? Runs inside a worker process.

Built on Math-Verify 0.9 (HuggingFace, github.com/huggingface/Math-Verify): its LaTeX
parser (latex2sympy2_extended) and its comparison of sets, tuples, intervals, matrices,
relations and equations. We depart from it where it is wrong:

- Answers are parsed as LaTeX, not scanned for the first number: bare ``4\\sqrt{2}`` is
  4*sqrt(2), not 4, and ``x+y-1=0`` is a line, not the number 0.
- Exact numbers must be exactly equal: Math-Verify rounds to 6 decimals, so 1/2004! equals
  1/2006! there. A decimal still matches a fraction within a relative tolerance.
- Symbols are taken as positive reals before simplifying, and failing that the two
  expressions are compared at random positive points: sqrt(1/n) = 1/sqrt(n) (for n > 0,
  which is what a contest answer means), while Math-Verify's complex simplify says no.

Nothing here calls ``eval``; plain-text expressions go through :mod:`rewards.math.safe_expr`.
"""

from __future__ import annotations

import random
import re
from typing import Any

import sympy
from latex2sympy2_extended.latex2sympy2 import NormalizationConfig
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from rewards.math.safe_expr import looks_like_plain_expression, safe_parse_expr

_LATEX_ONLY = [
    LatexExtractionConfig(
        boxed_match_priority=0,
        normalization_config=NormalizationConfig(
            basic_latex=True,
            units=True,
            malformed_operators=True,
            nits=True,
            boxed="all",
            equations=False,
        ),
    )
]
_WHOLE_TEXT = [LatexExtractionConfig(), ExprExtractionConfig()]
_TRIG = re.compile(r"\\(?:sin|cos|tan|cot|sec|csc)")
_DEGREES = re.compile(r"(\d+(?:\.\d+)?)\s*\^\s*\{?\s*\\circ\s*\}?")
_UNRELIABLE = (sympy.floor, sympy.ceiling, sympy.Piecewise, sympy.Mod, sympy.sign, sympy.Abs)


def parse_answer(answer: str, whole_text: bool = False, percent: str = "either") -> list[Any]:
    """Sympy readings of ``answer`` (Math-Verify's ``[expr, string]`` list); [] if unreadable.

    ``whole_text``: ``answer`` is a whole solution, let Math-Verify find the answer in it.
    """
    if whole_text:
        return parse(answer, _WHOLE_TEXT, parsing_timeout=None)
    text = answer.strip().strip("$").strip()
    if percent == "value":  # 50% is the number 0.5
        text = re.sub(r"\\?%", r"\\cdot\\frac{1}{100}", text)
    elif percent == "number":  # 50% is the number 50
        text = re.sub(r"\\?%", "", text)
    if _TRIG.search(text):  # \sin 30^\circ: degrees inside trig become radians
        text = _DEGREES.sub(r"(\1\\pi/180)", text)
    if looks_like_plain_expression(text):
        expr = safe_parse_expr(text)
        if expr is not None:
            return [expr, text]
    return parse(f"${text}$", _LATEX_ONLY, parsing_timeout=None)


def _sympy_items(parsed: list[Any]) -> list[Any]:
    return [p for p in parsed if isinstance(p, sympy.Basic | sympy.MatrixBase)]


def _is_number(x: Any) -> bool:
    return isinstance(x, sympy.Expr) and not x.free_symbols and not isinstance(x, sympy.Set)


def _numbers_disagree(gold: Any, pred: Any) -> bool:
    """True when two numeric constants are measurably different (the veto on Math-Verify)."""
    if not (_is_number(gold) and _is_number(pred)):
        return False
    if gold.has(sympy.UnevaluatedExpr) or pred.has(sympy.UnevaluatedExpr):
        return False  # percent readings: left to Math-Verify's own rule
    try:
        g, p = sympy.N(gold.doit(), 50), sympy.N(pred.doit(), 50)
        if (
            not (g.is_number and p.is_number)
            or g.has(sympy.zoo, sympy.nan)
            or p.has(sympy.zoo, sympy.nan)
        ):
            return False
        scale = max(abs(g), abs(p))
        if scale == 0:
            return False
        exact = not gold.has(sympy.Float) and not pred.has(sympy.Float)
        tolerance = sympy.Float("1e-30") if exact else sympy.Float("1e-5")
        return bool(abs(g - p) > tolerance * scale)
    except Exception:
        return False


def _positive(expr: Any) -> Any:
    return expr.subs({s: sympy.Dummy(s.name, positive=True) for s in expr.free_symbols})


def _same_on_positive_reals(gold: Any, pred: Any, points: int = 6, seed: int = 0) -> bool:
    """sympy's simplify with positive symbols, then a random-point check (Schwartz-Zippel style)."""
    if not (isinstance(gold, sympy.Expr) and isinstance(pred, sympy.Expr)):
        return False
    if isinstance(gold, sympy.Set) or isinstance(pred, sympy.Set):
        return False
    symbols = sorted(gold.free_symbols | pred.free_symbols, key=str)
    if not symbols or gold.free_symbols != pred.free_symbols:
        return False
    try:
        if sympy.simplify(_positive(gold - pred)) == 0:
            return True
    except Exception:
        pass
    if gold.has(*_UNRELIABLE) or pred.has(*_UNRELIABLE):
        return False  # piecewise functions can agree on a few points and differ elsewhere
    rng = random.Random(seed)
    for _ in range(points):
        values = {s: sympy.Rational(rng.randint(1100, 3900), 1000) for s in symbols}
        try:
            g = complex(sympy.N(gold.subs(values), 30))
            p = complex(sympy.N(pred.subs(values), 30))
        except Exception:
            return False
        if abs(g - p) > 1e-9 * max(1.0, abs(g), abs(p)):
            return False
    return True


def equivalent(
    gold: str,
    pred: str,
    whole_text: bool = False,
    percent: str = "either",
    float_rounding: int = 6,
    allow_set_relation_comp: bool = False,
) -> tuple[bool, str]:
    """``(equal, why)`` for a gold answer and a predicted answer string."""
    gold_parsed = parse_answer(gold, whole_text, percent)
    pred_parsed = parse_answer(pred, whole_text, percent)
    if not gold_parsed:
        return False, "gold_unparsed"
    if not pred_parsed:
        return False, "pred_unparsed"
    same = verify(
        gold_parsed,
        pred_parsed,
        float_rounding=float_rounding,
        allow_set_relation_comp=allow_set_relation_comp,
        timeout_seconds=None,  # the pool's hard timeout applies instead
    )
    golds, preds = _sympy_items(gold_parsed), _sympy_items(pred_parsed)
    if same:
        if golds and preds and _numbers_disagree(golds[0], preds[0]):
            return False, "exact_numbers_differ"
        return True, "math_verify"
    if golds and preds and _same_on_positive_reals(golds[0], preds[0]):
        return True, "positive_reals"
    return False, "different"
