"""Symbolic equivalence through the worker pool, one batch per table (workers start once)."""

from __future__ import annotations

import pytest

from rewards.math import check_many

# (gold, prediction, equal?) -- the first block is where Math-Verify 0.9.0 is wrong.
CASES = [
    ("4", "4\\sqrt{2}", False),
    ("x+y-1=0", "2x+y-1=0", False),
    ("2x-y+3=0", "x+2y-1=0", False),
    ("\\sqrt{1/n}", "\\frac{1}{\\sqrt{n}}", True),
    ("\\frac{1}{2004!}", "\\frac{1}{2006!}", False),
    # numbers and LaTeX
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),
    ("\\frac{\\sqrt{2}}{2}", "sqrt(2)/2", True),
    ("2\\pi", "6.283185", True),
    ("\\pi", "3", False),
    ("\\log_2 8", "3", True),
    ("\\ln(e^2)", "2", True),
    ("\\sin 30^\\circ", "\\frac{1}{2}", True),
    ("\\cos(\\pi/3)", "0.5", True),
    ("\\tan 45^{\\circ}", "1", True),
    ("2^{10}", "1024", True),
    ("10\\text{ cm}", "10", True),
    ("90^\\circ", "90", True),
    # algebra
    ("(x+1)^2", "x^2+2x+1", True),
    ("\\frac{x+2}{7}", "\\frac{x}{7}+\\frac{2}{7}", True),
    ("x^2+1", "x^2-1", False),
    ("\\sqrt{a^2}", "a", True),  # symbols are positive reals, as contest answers mean
    # equations: same solution set
    ("x+y-1=0", "2x+2y-2=0", True),
    ("y=2x+1", "2x-y+1=0", True),
    ("x=2", "x-2=0", True),
    ("x^2=4", "x=2", False),
    # sets, tuples, intervals, matrices
    ("\\{1,2,3\\}", "\\{3,1,2\\}", True),
    ("(1,2)", "(2,1)", False),
    ("(3,4,5)", "(3,4,5)", True),
    ("[1,2)", "[1,2)", True),
    ("[1,2)", "[1,2]", False),
    ("(-\\infty,3]", "(-\\infty,3)", False),
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}", True),
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\4&3\\end{pmatrix}", False),
    ("32349", "32, 349", False),
    # garbage and attacks: scored 0, never executed
    ("5", "__import__('os').system('true')", False),
    ("5", "}}}{{{\\frac", False),
]


@pytest.mark.slow
def test_equivalence_table() -> None:
    verdicts = check_many([(g, p) for g, p, _ in CASES], timeout_s=10)
    wrong = [(g, p, e, v) for (g, p, e), v in zip(CASES, verdicts, strict=True) if v.equal != e]
    assert not wrong
