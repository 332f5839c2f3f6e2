"""Verdicts that need no sympy: plain numbers, multiple-choice letters, identical strings.

Most answers in GSM8K-style and competition data are plain numbers, and a GRPO group repeats
the same few answers many times, so deciding these in the trainer's process (exactly, with
``fractions.Fraction``) keeps the worker pool for the answers that need algebra.
"""

from __future__ import annotations

import re
from fractions import Fraction

# Spellings that carry no mathematical content.
_NOISE = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\\ |~|\\displaystyle|\\textstyle|\s+")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\{([^{}]*)\}")
_UNIT_WORDS = re.compile(
    r"(?<=\d)\s*(?:\\text\{\s*)?(?:dollars?|cents?|cm|km|mm|m|kg|g|meters?|miles?|feet|ft|"
    r"inches|units?|degrees?|hours?|minutes?|seconds?|days?|years?|sq\.?\s*units?)\.?\}?\s*$",
    re.IGNORECASE,
)
_NUMBER = re.compile(
    r"(?P<sign>[-+]?)(?:(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<frac>\d*))?|\.(?P<frac2>\d+))"
    r"(?:(?:[eE](?P<exp>[-+]?\d+))|(?:\\times|\\cdot|\*|x)10\^\{?(?P<exp2>[-+]?\d+)\}?)?"
)
_FRACTION = re.compile(
    r"(?P<sign>-?)(?:\\[dt]?frac\{(?P<n>-?\d+)\}\{(?P<d>\d+)\}|(?P<n2>-?\d+)/(?P<d2>\d+))"
)
_CHOICE = re.compile(r"^\(?([A-E])\)?(?:[.):]|$)")


def normalize(answer: str) -> str:
    """A canonical spelling: no spaces or sizing commands, ``\\dfrac`` -> ``\\frac``, no $ or degree marks."""
    s = _NOISE.sub("", answer)
    s = (
        s.replace("\\dfrac", "\\frac")
        .replace("\\tfrac", "\\frac")
        .replace("\\$", "")
        .replace("$", "")
    )
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\circ", "").replace("°", "")
    return s.rstrip(".")


def parse_plain_number(answer: str) -> tuple[Fraction, int, bool] | None:
    """``(value, decimal places written, is_percent)`` if ``answer`` is one plain number, else None.

    Accepts ``1,234``, ``-3.5``, ``.5``, ``1.5e3``, ``1.5\\times10^{3}``, ``3/4``, ``\\frac{3}{4}``,
    ``50\\%``, ``\\$12``, ``12 dollars``. Decimals are kept exact (Fraction("0.1") is 1/10).
    """
    if re.search(r",\s", answer):  # "32, 349" is a list of two numbers, not 32349
        return None
    s = _UNIT_WORDS.sub("", answer.strip())
    s = _TEXT_WRAPPER.sub(r"\1", s)
    s = normalize(s)
    percent = s.endswith(("\\%", "%"))
    s = s.removesuffix("\\%").removesuffix("%")
    if s.endswith("percent"):
        percent, s = True, s.removesuffix("percent")
    m = _FRACTION.fullmatch(s)
    if m:
        numerator = int(m["n"] if m["n"] is not None else m["n2"])
        denominator = int(m["d"] if m["d"] is not None else m["d2"])
        if denominator == 0:
            return None
        value = Fraction(numerator, denominator)
        return (-value if m["sign"] else value), 0, percent
    m = _NUMBER.fullmatch(s)
    if not m:
        return None
    integer = (m["int"] or "0").replace(",", "")
    frac = m["frac"] if m["frac"] is not None else (m["frac2"] or "")
    exp_text = m["exp"] or m["exp2"]
    if exp_text is not None and abs(int(exp_text)) > 400:  # 1e99999 is a hang, not a number
        return None
    value = Fraction(int(integer + frac), 10 ** len(frac)) * Fraction(10) ** int(exp_text or 0)
    decimals = len(frac) if (frac or "." in s) else 0
    return (-value if m["sign"] == "-" else value), decimals, percent


def numbers_equal(
    gold: tuple[Fraction, int, bool],
    pred: tuple[Fraction, int, bool],
    percent: str = "either",
    rel_tol: float = 1e-6,
) -> bool:
    """Exact equality, with a relative tolerance only when one side is written as a decimal.

    ``percent``: "either" (50% matches 50 and 0.5), "value" (50% is 0.5 only), "number" (50% is
    50 only). A decimal such as 0.333333 may stand for 1/3, as in Math-Verify's numeric
    comparison, when it is within ``rel_tol`` or is the other value rounded to its 6+ places
    (0.333333 is 1/3, 0.33 is not); two exact values (integers, fractions) must be exactly equal, so 1/2004! and
    1/2006! are different.
    """
    (g, g_dec, g_pct), (p, p_dec, p_pct) = gold, pred
    gold_values = _percent_readings(g, g_pct, percent)
    pred_values = _percent_readings(p, p_pct, percent)
    places = max(g_dec, p_dec)
    for gv in gold_values:
        for pv in pred_values:
            if gv == pv:
                return True
            if places and abs(gv - pv) <= Fraction(rel_tol) * max(abs(gv), abs(pv)):
                return True
            if places >= 6 and abs(gv - pv) <= Fraction(1, 2 * 10**places):
                return True
    return False


def _percent_readings(value: Fraction, is_percent: bool, mode: str) -> list[Fraction]:
    if not is_percent:
        return [value]
    if mode == "number":
        return [value]
    if mode == "value":
        return [value / 100]
    return [value, value / 100]


def choice_letter(answer: str) -> str | None:
    """``C``, ``(C)``, ``\\text{(C)}``, ``C) 12``, ``\\textbf{C}``: the letter, upper-case; else None."""
    s = _TEXT_WRAPPER.sub(r"\1", answer.strip())
    s = _TEXT_WRAPPER.sub(r"\1", s).strip().strip("$").strip()
    m = _CHOICE.match(s)
    return m.group(1).upper() if m else None
