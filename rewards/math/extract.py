"""Find the final answer a completion states. Pure string work: runs in the trainer's process.

Extraction order (the ``order`` option changes it; names below):

0. ``answer_tag``: if the completion has a closed ``<answer>...</answer>`` (the R1 template of
   DeepSeek-AI 2025, Table 1), everything below looks only inside the last one, and if nothing
   below matches, the tag's whole content is the answer (so ``<answer>42</answer>`` counts).
1. ``boxed``: the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces; several boxed: the last).
2. ``answer_is``: "the (final) answer is ..." up to the end of the line / sentence.
3. ``gsm8k``: the GSM8K marker ``#### N`` (Cobbe et al. 2021).
4. ``last_latex`` (opt-in): the last ``$...$`` / ``\\(...\\)`` / ``\\[...\\]`` math span.
5. ``last_number`` (opt-in): the last number in the text.

Without any match the answer is None and the reward 0: a completion that states no answer
must not be rewarded for a number that happens to appear in its reasoning.
"""

from __future__ import annotations

import re

DEFAULT_ORDER: tuple[str, ...] = ("answer_tag", "boxed", "answer_is", "gsm8k")
STRATEGIES = ("answer_tag", "boxed", "answer_is", "gsm8k", "last_latex", "last_number")

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(
    r"(?:final\s+answer|the\s+answer)\s*(?:is|:|=)\s*:?\s*(.+?)(?:\n|$|\.(?:\s|$))",
    re.IGNORECASE,
)
_GSM8K = re.compile(r"####\s*([^\n]+)")
_LATEX_SPAN = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, nested braces handled; None if none is closed."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(
        starts
    ):  # an unclosed last box (truncated output) falls back to the one before
        depth = 1
        for j in range(start, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:j]
    return None


def _answer_is(text: str) -> str | None:
    found = _ANSWER_IS.findall(text)
    if not found:
        return None
    said = found[-1].strip()
    boxed = last_boxed(said)
    return boxed if boxed is not None else said


def _last_latex(text: str) -> str | None:
    spans = [next(g for g in m.groups() if g is not None) for m in _LATEX_SPAN.finditer(text)]
    spans = [s for s in spans if s.strip()]
    return spans[-1] if spans else None


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


_FINDERS = {
    "boxed": last_boxed,
    "answer_is": _answer_is,
    "gsm8k": lambda t: m[-1] if (m := _GSM8K.findall(t)) else None,
    "last_latex": _last_latex,
    "last_number": _last_number,
}


def extract_answer(text: str, order: tuple[str, ...] | list[str] = DEFAULT_ORDER) -> str | None:
    """The final answer ``text`` states, or None, following ``order`` (see the module doc).

    >>> extract_answer("<think>2+2</think><answer>\\\\boxed{4}</answer>")
    '4'
    >>> extract_answer("so x = 3. #### 3")
    '3'
    """
    unknown = set(order) - set(STRATEGIES)
    if unknown:
        raise ValueError(f"unknown extraction strategies {sorted(unknown)}; known: {STRATEGIES}")
    tag: str | None = None
    if "answer_tag" in order:
        tags = _ANSWER_TAG.findall(text)
        if tags:
            tag = tags[-1]
            text = tag
    for name in order:
        if name == "answer_tag":
            continue
        found = _FINDERS[name](text)
        if found is not None and found.strip():
            return found.strip()
    if tag is not None and tag.strip():
        return tag.strip()
    return None


def strip_math_delimiters(answer: str) -> str:
    """``$x$``, ``\\(x\\)``, ``\\[x\\]``, ``\\boxed{x}``, a trailing full stop: all become ``x``."""
    s = answer.strip()
    boxed = last_boxed(s)
    if boxed is not None and s.startswith(("\\boxed", "$\\boxed", "\\(\\boxed", "\\[\\boxed")):
        s = boxed.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left) : len(s) - len(right)].strip()
    return s.rstrip(".").strip()
