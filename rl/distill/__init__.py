"""Distillation: a small model learns from a stronger one (docs/distillation.md).

- ``aha distill generate`` (rl/distill/generate.py): the teacher samples traces for the
  config's prompts, the config's rewards verify them, and the passing ones are written as a
  Hugging Face dataset of chat messages (rl/distill/traces.py), R1's rejection sampling.
- ``aha distill sft`` (rl/distill/sft.py): TRL's ``SFTTrainer`` fine-tunes a student on such a
  dataset into an aha run folder that ``aha eval``, ``aha train model.name=...`` and
  ``resume=`` take.
- rl/distill/teacher.py loads a teacher (a model, a run folder or a vLLM server) with one
  function, for these commands and for on-policy distillation alike.
- rl/distill/on_policy.py: on-policy distillation's teacher in the training step
  (``algorithm.teacher``): it scores the student's own tokens, and the objective turns its
  log-probs into per-token advantages (rl/algorithms/distill.py).

The trainer imports on_policy.py only; TRL is imported by the sft command only.
"""
