"""The ``reasoning_gym`` reward: reasoning-gym's own verifier (github.com/open-thought/reasoning-gym).

Procedural tasks (countdown, ...) have many right answers (any expression reaching the
target), which an answer-equality check cannot judge; the generator's verifier can. It reads
the row's ``metadata`` column (JSON text or a dict with ``source_dataset``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from rewards.math.extract import extract_answer
from rewards.registry import ANSWER_COLUMN, register_reward
from rewards.text import completion_text

_EXTRACT_ORDER = ("answer_tag", "boxed", "answer_is")


@register_reward("reasoning_gym")
def reasoning_gym_reward(
    prompts: list,
    completions: list,
    metadata: list | None = None,
    answer: list | None = None,
    log_extra: Callable[[str, list], None] | None = None,
    **_: Any,
) -> list[float | None]:
    """reasoning-gym's own verifier score (0..1) for rows that carry its ``metadata``; else None."""
    if metadata is None:
        return [None] * len(completions)
    import reasoning_gym

    scores: list[float | None] = []
    graded: list[str | None] = [None] * len(completions)  # for the evaluation's majority vote
    for i, (completion, meta) in enumerate(zip(completions, metadata, strict=True)):
        try:
            meta = json.loads(meta) if isinstance(meta, str) else meta
            if not isinstance(meta, dict) or "source_dataset" not in meta:
                scores.append(None)
                continue
            stated = extract_answer(completion_text(completion), _EXTRACT_ORDER)
            if stated is None:
                scores.append(0.0)
                continue
            entry = {
                "question": prompts[i] if prompts else "",
                "answer": answer[i] if answer else None,
                "metadata": meta,
            }
            score = reasoning_gym.get_score_answer_fn(meta["source_dataset"])(stated, entry)
            scores.append(float(score))
            graded[i] = " ".join(stated.split())
        except Exception:  # a verifier bug must not stop training: this sample is unscored
            scores.append(None)
    if log_extra is not None:
        log_extra(ANSWER_COLUMN, graded)
    return scores
