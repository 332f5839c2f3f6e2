"""On-policy distillation's teacher in the training step (``algorithm.teacher``).

The student samples as in RL; before the update the teacher scores the student's own tokens:
its log-prob of each completion token after the same prompt and completion prefix, [B, T],
computed where the reference's are (``with_teacher_logps``, once per generation batch) and
turned into per-token advantages by the registered ``algorithm.teacher_advantage``
(rl/algorithms/distill.py) inside the objective.

The teacher is frozen: a model beside the reference, sharded the same way by the training
scheme (FSDP2 shards it, ZeRO leaves it whole, as the reference), at ``rollout.temperature``
like the student's log-probs; or a vLLM server's prompt log-probs (untempered, so the config
refuses a server unless ``rollout.temperature`` is 1). It must tokenize as the student does
(``check_same_tokenizer``): it reads the student's token ids.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from rl.batch import TokenBatch, logps_in_chunks
from rl.config import Config, ConfigError
from rollouts.record import Prompt


class TeacherScorer(Protocol):
    def logps(self, trainer, batch: TokenBatch) -> torch.Tensor:
        """The teacher's log-prob of each completion token of ``batch``: [B, T] on the CPU, 0
        on padding."""
        ...


@dataclass
class LocalTeacher:
    """A frozen model in this process (prepared by the training scheme)."""

    model: Any

    @torch.no_grad()
    def logps(self, trainer, batch: TokenBatch) -> torch.Tensor:
        from rl.trainer import autocast, chunk_tokens

        config = trainer.config
        with autocast(trainer):
            return logps_in_chunks(
                self.model,
                batch,
                config.train.micro_batch_size,
                config.rollout.temperature,
                chunk_tokens(trainer),
                config.train.share_prompts,
            )


@dataclass
class ServerTeacher:
    """A vLLM server: each sequence's prompt log-probs (rollouts.server.prompt_logprobs)."""

    url: str
    model: str

    def logps(self, trainer, batch: TokenBatch) -> torch.Tensor:
        from rollouts.server import prompt_logprobs

        width = batch.prompt_width
        sequences, starts = [], []
        rows = zip(batch.input_ids.tolist(), batch.attention_mask.tolist(), strict=True)
        for ids, attention in rows:
            sequences.append([i for i, keep in zip(ids, attention, strict=True) if keep])
            starts.append(sum(attention[:width]))  # the prompt's length: the completion's start
        out = torch.zeros(len(batch), batch.completion_width)
        scored = prompt_logprobs(self.url, self.model, sequences, starts)
        for row, values in enumerate(scored):
            out[row, : len(values)] = torch.tensor(values)
        return out


def with_teacher_logps(trainer, batch: TokenBatch, timings: dict[str, float]) -> TokenBatch:
    """``batch`` with the teacher's log-probs of its completion tokens (timed as
    ``timing_s/teacher``); as it is without a teacher."""
    teacher: TeacherScorer | None = getattr(trainer, "teacher", None)
    if teacher is None:
        return batch
    clock = time.perf_counter()
    batch = replace(batch, teacher_logps=teacher.logps(trainer, batch))
    timings["timing_s/teacher"] = time.perf_counter() - clock
    return batch


def build_teacher(
    config: Config, tokenizer, prompts: list[Prompt], device: torch.device, scheme
) -> TeacherScorer | None:
    """``algorithm.teacher`` loaded (rl.distill.teacher.load_teacher), checked against the
    student's ``tokenizer`` on ``prompts`` (a few of the training prompts, as the student's chat
    template rendered them), frozen on ``device`` and prepared by the training ``scheme``. None
    without a teacher."""
    from rl.distill.teacher import load_teacher

    target = config.algorithm.teacher
    if not target:
        return None
    teacher = load_teacher(config, target)
    probes = prompts[:4]
    if teacher.on_server:
        from rollouts.server import ServerError, served_model, tokenize_on_server

        try:
            served = tokenize_on_server(teacher.config.rollout.server_url, probes, tokenizer)
        except ServerError as error:
            raise ConfigError(f"algorithm.teacher: {error}") from None
        _refuse_if(target, _first_prompt_difference(probes, served, tokenizer))
        url = teacher.config.rollout.server_url
        return ServerTeacher(url, served_model(url))
    check_same_tokenizer(tokenizer, teacher.tokenizer, probes, target)
    model = teacher.model
    if hasattr(model, "merge_and_unload"):  # a LoRA run's adapter: merged once, a plain model
        model = model.merge_and_unload()
    model = model.to(device).eval().requires_grad_(False)
    return LocalTeacher(scheme.prepare_frozen(model))


# ------------------------------------------------------------------------- the tokenizer check


def tokenizer_difference(student, teacher, prompts: list[Prompt]) -> str | None:
    """What makes ``teacher`` tokenize differently from ``student``, in a few words, or None:
    the vocabulary (token -> id), the special tokens, or the chat template's ids for the same
    ``prompts`` (the messages rendered by each tokenizer, with the response prefix)."""
    student_vocab, teacher_vocab = student.get_vocab(), teacher.get_vocab()
    if len(student_vocab) != len(teacher_vocab):
        return f"vocabulary of {len(teacher_vocab)} tokens, the student's {len(student_vocab)}"
    moved = [t for t, i in student_vocab.items() if teacher_vocab.get(t) != i]
    if moved:
        token = sorted(moved)[0]
        return (
            f"{len(moved)} tokens have other ids, e.g. {token!r}: {teacher_vocab.get(token)} "
            f"(the student's {student_vocab[token]})"
        )
    for name in ("eos_token", "bos_token"):
        ours, theirs = getattr(student, name, None), getattr(teacher, name, None)
        if ours != theirs:
            return f"{name} {theirs!r}, the student's {ours!r}"
    teacher_ids = [_render(teacher, p) for p in prompts]
    return _first_prompt_difference(prompts, teacher_ids, student)


def _render(tokenizer, prompt: Prompt) -> list[int]:
    """The prompt's messages as ``tokenizer``'s chat template renders them (rl.data's way)."""
    if isinstance(prompt.messages, str):
        ids = tokenizer.encode(prompt.messages, add_special_tokens=False)
    else:
        ids = tokenizer.apply_chat_template(
            prompt.messages, add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "keys"):  # a BatchEncoding
            ids = ids["input_ids"]
    prefix = prompt.response_prefix
    return [*ids, *(tokenizer.encode(prefix, add_special_tokens=False) if prefix else [])]


def _first_prompt_difference(
    prompts: list[Prompt], teacher_ids: list[list[int]], student
) -> str | None:
    for prompt, theirs in zip(prompts, teacher_ids, strict=True):
        ours = list(prompt.ids)
        if theirs != ours:
            at = next(
                (k for k, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                min(len(ours), len(theirs)),
            )
            return (
                f"its chat template renders training prompt {prompt.index} as {len(theirs)} "
                f"tokens, the student's as {len(ours)}, first apart at token {at} "
                f"({student.decode(ours[at : at + 3])!r} for the student)"
            )
    return None


def check_same_tokenizer(student, teacher, prompts: list[Prompt], target: str) -> None:
    """Refuse (ConfigError, one line) a teacher that tokenizes differently from the student."""
    _refuse_if(target, tokenizer_difference(student, teacher, prompts))


def _refuse_if(target: str, difference: str | None) -> None:
    if difference is not None:
        raise ConfigError(
            f"algorithm.teacher: {target} does not tokenize as the student does: {difference}. "
            "The teacher scores the student's own token ids, so both need one tokenizer and "
            "chat template"
        )
