"""The ``math`` reward: 1 if the completion's final answer equals the row's ``answer``, else 0.

Pipeline per completion: extract the answer (:mod:`rewards.math.extract`, trainer process) ->
decide plain numbers, choice letters and identical spellings at once
(:mod:`rewards.math.fastpath`) -> otherwise ask a worker process for a symbolic verdict
(:mod:`rewards.math.equivalence` via :mod:`rewards.math.pool`, hard timeout). Verdicts are
cached, since a GRPO group repeats the same few answers.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from rewards.math.extract import DEFAULT_ORDER, extract_answer, last_boxed, strip_math_delimiters
from rewards.math.fastpath import choice_letter, normalize, numbers_equal, parse_plain_number
from rewards.math.pool import Verdict, get_pool
from rewards.registry import ANSWER_COLUMN, register_reward
from rewards.text import completion_text

_CACHE: OrderedDict[tuple, Verdict] = OrderedDict()
_CACHE_SIZE = 100_000
_CACHE_LOCK = threading.Lock()


def gold_answer(gold: Any) -> str:
    """The dataset's answer as a bare string: ``27.0`` -> ``27``, ``$\\boxed{x}$`` -> ``x``."""
    if isinstance(gold, float) and gold.is_integer():
        return str(int(gold))
    text = str(gold).strip()
    boxed = last_boxed(text)
    return strip_math_delimiters(boxed if boxed is not None else text)


def decide_fast(
    gold: str, pred: str, percent: str = "either", rel_tol: float = 1e-6
) -> bool | None:
    """A verdict without sympy, or None when the answers need the symbolic checker."""
    letter = choice_letter(gold)
    if (
        letter is not None and len(normalize(gold).strip("()")) <= 12
    ):  # gold is a choice: "C", "(C)", "\text{C}"
        return choice_letter(pred) == letter
    if normalize(gold) == normalize(pred):
        return True
    gold_number, pred_number = parse_plain_number(gold), parse_plain_number(pred)
    if gold_number is not None and pred_number is not None:
        return numbers_equal(gold_number, pred_number, percent, rel_tol)
    return None


def check_many(
    pairs: list[tuple[str, str]],
    percent: str = "either",
    rel_tol: float = 1e-6,
    timeout_s: float = 5.0,
    whole_text: bool = False,
    allow_set_relation_comp: bool = False,
) -> list[Verdict]:
    """Verdicts for ``(gold answer, predicted answer)`` pairs, in order. Never raises."""
    options = {
        "percent": percent,
        "whole_text": whole_text,
        "allow_set_relation_comp": allow_set_relation_comp,
    }
    key_options = tuple(sorted(options.items())) + (("rel_tol", rel_tol),)
    verdicts: list[Verdict | None] = []
    todo: dict[tuple, list[int]] = {}
    for i, (gold, pred) in enumerate(pairs):
        fast = None if whole_text else decide_fast(gold, pred, percent, rel_tol)
        if fast is not None:
            verdicts.append(Verdict(fast, "fast"))
            continue
        key = (gold, pred, key_options)
        with _CACHE_LOCK:
            cached = _CACHE.get(key)
        verdicts.append(cached)
        if cached is None:
            todo.setdefault(key, []).append(i)
    if todo:
        keys = list(todo)
        try:
            results = get_pool().check_many([(k[0], k[1]) for k in keys], options, timeout_s)
        except Exception as error:  # the pool itself failed: score 0 and say so, never raise
            results = [Verdict(False, f"pool_error:{type(error).__name__}")] * len(keys)
        for key, verdict in zip(keys, results, strict=True):
            if not verdict.why.startswith(("crash", "pool_error")):
                with _CACHE_LOCK:
                    _CACHE[key] = verdict
                    if len(_CACHE) > _CACHE_SIZE:
                        _CACHE.popitem(last=False)
            for i in todo[key]:
                verdicts[i] = verdict
    return [v if v is not None else Verdict(False, "missing") for v in verdicts]


def vote_key(stated: str) -> str:
    """The answer graded, spelled so that equal plain numbers vote together (``8``, ``8.0``;
    ``1/2``, ``0.5``, ``\\frac{1}{2}``), anything else in its normalized spelling: what the
    evaluation's majority vote counts."""
    answer = strip_math_delimiters(stated)
    number = parse_plain_number(answer)
    if number is not None:
        value, _, percent = number
        return f"{value}{'%' if percent else ''}"
    return normalize(answer)[:200]


def answers_equal(gold: Any, pred: str, **options: Any) -> bool:
    """One comparison of two answer strings (what ``aha eval`` and tests call)."""
    return check_many([(gold_answer(gold), strip_math_delimiters(pred))], **options)[0].equal


@register_reward("math", columns=("answer",))
def math_reward(
    prompts: list,
    completions: list,
    answer: list | None = None,
    order: tuple[str, ...] | list[str] = DEFAULT_ORDER,
    percent: str = "either",
    rel_tol: float = 1e-6,
    timeout_s: float = 5.0,
    allow_set_relation_comp: bool = False,
    log_extra: Callable[[str, list], None] | None = None,
    log_metric: Callable[[str, float], None] | None = None,
    **_: Any,
) -> list[float | None]:
    """1 if the completion's final answer is mathematically equal to the row's `answer`, else 0.

    Options: ``order`` (extraction strategies, see :mod:`rewards.math.extract`), ``percent``
    ("either" | "value" | "number"), ``rel_tol`` (for answers written as decimals),
    ``timeout_s`` (hard limit per symbolic check; a timeout scores 0 and is logged).
    """
    if answer is None:
        return [None] * len(completions)
    try:
        stated = [extract_answer(completion_text(c), tuple(order)) for c in completions]
        pending = [
            i
            for i, (s, g) in enumerate(zip(stated, answer, strict=True))
            if s is not None and g is not None
        ]
        verdicts = check_many(
            [(gold_answer(answer[i]), strip_math_delimiters(stated[i] or "")) for i in pending],
            percent=percent,
            rel_tol=rel_tol,
            timeout_s=timeout_s,
            allow_set_relation_comp=allow_set_relation_comp,
        )
    except Exception:  # never raise into the trainer; an unscorable batch is "does not apply"
        return [None] * len(completions)
    scores: list[float | None] = [None if g is None else 0.0 for g in answer]
    why = ["no_gold" if g is None else "no_answer" for g in answer]
    for i, verdict in zip(pending, verdicts, strict=True):
        scores[i] = 1.0 if verdict.equal else 0.0
        why[i] = verdict.why
    if log_extra is not None:
        log_extra(ANSWER_COLUMN, [s if s is None else vote_key(s) for s in stated])
        log_extra("math/verdict", why)
    if log_metric is not None and completions:
        n = len(completions)
        log_metric("math/no_answer_frac", why.count("no_answer") / n)
        log_metric("math/timeout_frac", why.count("timeout") / n)
    return scores
