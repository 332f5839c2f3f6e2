"""The teacher: a model, a run folder (its model at its latest checkpoint) or a vLLM server.

``load_teacher`` is the one way to get it, for ``aha distill generate`` (which samples from it
through ``teacher_engine``) and for an on-policy distillation objective (which needs its frozen
model, or a server, to score the student's samples, and its tokenizer to refuse a mismatch).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl.config import Config, ConfigError
from rl.models import EMBEDDED, TINY, ModelNotFoundError


@dataclass
class Teacher:
    target: str  # as given: a model name or folder, a run folder, or a vLLM server's URL
    # The config it samples with: the caller's, with the teacher's model section (a run
    # folder's own, LoRA included) or, for a server, rollout.server_url in frozen mode.
    config: Config
    tokenizer: Any
    model: Any | None  # frozen (eval mode, no gradients); None when only a server holds it
    folder: Path | None  # the model's Hugging Face folder (vLLM loads it); None for a server
    checkpoint: Path | None  # a run folder's latest checkpoint, whose weights the model holds

    @property
    def on_server(self) -> bool:
        return self.model is None


def is_server_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


def teacher_config(config: Config, target: str) -> tuple[Config, Path | None]:
    """A copy of ``config`` that names the teacher, and the checkpoint to load (run folders)."""
    from rl.setup import load_run, run_folder

    config = copy.deepcopy(config)
    if is_server_url(target):
        rollout = config.rollout
        rollout.engine, rollout.server_url, rollout.server_mode = "vllm", target, "frozen"
        return config, None
    run_dir = run_folder(target)
    if run_dir is None:  # a model: plain weights (a LoRA adapter folder is merged on load)
        config.model.name = target
        config.model.lora.enabled = False
        return config, None
    run_config, checkpoint = load_run(run_dir)
    if checkpoint is None:
        raise ConfigError(f"teacher: the run folder {run_dir} has no complete checkpoint yet")
    config.model = run_config.model
    return config, checkpoint


def load_teacher(config: Config, target: str) -> Teacher:
    """The teacher named by ``target``, frozen, on the GPU where there is one. For a server URL
    no model is loaded: the config's ``model.name`` must name the served model's tokenizer
    (prompts go to the server as token ids)."""
    from rl.setup import load_frozen_policy

    config, checkpoint = teacher_config(config, target)
    if is_server_url(target):
        return Teacher(target, config, _tokenizer_only(config.model.name), None, None, None)
    model, tokenizer, folder = load_frozen_policy(config, checkpoint)
    return Teacher(target, config, tokenizer, model, folder, checkpoint)


def teacher_engine(teacher: Teacher):
    """The configured rollout engine sampling from the teacher (rl.setup.frozen_engine)."""
    from rl.setup import frozen_engine

    engine = frozen_engine(teacher.config, teacher.model, teacher.tokenizer, teacher.folder)
    served = getattr(engine, "model", None) if teacher.on_server else None
    if isinstance(served, str) and Path(served).name != Path(teacher.config.model.name).name:
        print(
            f"note: the server serves {served!r}; prompts are tokenized with model.name="
            f"{teacher.config.model.name!r}, whose tokenizer must be the same",
            flush=True,
        )
    return engine


def _tokenizer_only(name: str):
    """A model's tokenizer without its weights (a teacher on a server may be far too big)."""
    from rl.models import load_tokenizer, resolve_model

    if name in (EMBEDDED, TINY):
        return load_tokenizer(resolve_model(name))
    if Path(name).expanduser().is_dir():
        return load_tokenizer(Path(name).expanduser())
    try:  # a hub id: the tokenizer files only
        return load_tokenizer(name)
    except Exception as error:  # offline, unknown repo
        raise ModelNotFoundError(
            f"model.name: cannot load the tokenizer of {name!r} for the teacher's server: "
            f"{str(error).splitlines()[0]}"
        ) from None
