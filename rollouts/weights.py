"""The trainer's weights as the checkpoint vLLM loads: peft's prefixes stripped, LoRA merged on
the fly (``W + (alpha / r) * B @ A``, on the experts' fused weights too), tied embeddings given
their output layer, streamed one tensor at a time. Pure torch, no vLLM import: the colocated
engine (rollouts/vllm_engine.py) and the server engine (rollouts/server.py) both push these.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

PEFT_PREFIX = "base_model.model."


def vllm_named_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    tie_word_embeddings: bool,
    lora_scaling: float | None = None,
    checkpoint_names: Callable[[str, torch.Tensor], Iterable] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``_merged_tensors``, each in the checkpoint's layout where ``checkpoint_names`` says how
    (a mixture of experts' fused expert tensors split per expert, as vLLM's loader reads them)."""
    merged = _merged_tensors(named_tensors, tie_word_embeddings, lora_scaling)
    if checkpoint_names is None:
        yield from merged
        return
    for name, tensor in merged:
        yield from checkpoint_names(name, tensor)


def _merged_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    tie_word_embeddings: bool,
    lora_scaling: float | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The trainer's parameters as a plain HF checkpoint: peft prefixes stripped, LoRA merged
    (``W + scaling * B @ A``), and ``lm_head.weight`` added for tied embeddings (vLLM's reload
    otherwise keeps the old output layer).

    Streamed: each tensor is handed on as soon as it is complete, so only one merged tensor
    exists at a time (peft lists a layer's base weight just before its A and B matrices; a base
    weight waits for them, and nothing else waits). The tied output layer is the embedding
    table itself, handed on right after it (a later ``lm_head.weight``, if any, wins)."""
    bases: dict[str, tuple[str, torch.Tensor]] = {}  # module -> its base weight, waiting
    adapters: dict[str, dict[str, torch.Tensor]] = {}  # module -> lora_A / lora_B, waiting
    experts: dict[str, _ExpertAdapters] = {}  # experts module -> its wrapped fused weights
    for name, tensor in named_tensors:
        name, tensor = name.removeprefix(PEFT_PREFIX), tensor.detach()
        module, kind = _lora_part(name)
        root = module.split(".base_layer")[0]
        if kind is not None and lora_scaling is None:
            raise ValueError(
                "LoRA tensors pushed to the vLLM engine without lora_scaling (alpha / r)"
            )
        if root in experts and (kind is not None or ".base_layer." in name):
            waiting = experts[root]
            waiting.add(module, kind, name, tensor)
            if waiting.complete():
                yield from waiting.merged(lora_scaling)
                del experts[root]
            continue
        if kind is not None:  # an adapter matrix, folded into its base weight
            adapters.setdefault(module, {}).setdefault(kind, tensor)
        elif ".base_layer." in name and tensor.dim() == 3:  # an expert weight peft wraps
            experts[root] = _ExpertAdapters()
            experts[root].add(module, None, name, tensor)
            continue
        elif ".lora_" in name:
            continue  # other adapter kinds (embedding, DoRA magnitude): not pushed
        elif ".base_layer." in name and name.endswith(".weight"):
            module = name.split(".base_layer.")[0]
            bases[module] = (name.replace(".base_layer.", "."), tensor)
        else:
            yield name.replace(".base_layer.", "."), tensor
            if tie_word_embeddings and name == "model.embed_tokens.weight":
                yield "lm_head.weight", tensor
            continue
        parts = adapters.get(module, {})
        if module in bases and len(parts) == 2:  # complete: merge and hand on
            base_name, base = bases.pop(module)
            del adapters[module]
            yield base_name, _merged(base, parts["lora_A"], parts["lora_B"], lora_scaling)
    for base_name, base in bases.values():  # a base layer without its two matrices: as it is
        yield base_name, base
    for waiting in experts.values():  # expert weights whose adapters never came: as they are
        yield from waiting.bases.items()


class _ExpertAdapters:
    """A MoE layer's fused expert weights under peft's ``target_parameters`` LoRA, waiting for
    their adapters. peft nests one ``ParamWrapper`` per targeted parameter, so the weights are
    named ``experts.base_layer.base_layer.gate_up_proj`` (as many ``base_layer`` as wrappers)
    and the adapter pairs sit at ``experts``, ``experts.base_layer``, ...; which pair adapts
    which weight is not in the names, so each weight takes the one pair whose shapes fit it."""

    def __init__(self) -> None:
        self.bases: dict[str, torch.Tensor] = {}  # checkpoint name -> fused [E, ., .] weight
        self.pairs: dict[str, dict[str, torch.Tensor]] = {}  # wrapper -> lora_A / lora_B
        self.wrappers = 0

    def add(self, module: str, kind: str | None, name: str, tensor: torch.Tensor) -> None:
        if kind is None:
            self.wrappers = max(self.wrappers, name.count(".base_layer"))
            self.bases[name.replace(".base_layer", "")] = tensor
        else:
            self.pairs.setdefault(module, {})[kind] = tensor

    def complete(self) -> bool:
        return len(self.pairs) == self.wrappers and all(len(p) == 2 for p in self.pairs.values())

    def merged(self, scaling: float) -> Iterator[tuple[str, torch.Tensor]]:
        pairs = list(self.pairs.values())
        for name, base in self.bases.items():
            fitting = [
                (index, layout)
                for index, pair in enumerate(pairs)
                if (layout := _expert_delta_layout(base, pair["lora_A"], pair["lora_B"]))
            ]
            if len(fitting) != 1:
                raise ValueError(f"{name}: {len(fitting)} LoRA adapter pairs fit its shape")
            index, layout = fitting[0]
            pair = pairs.pop(index)  # by position: == on tensors is elementwise
            yield name, _merged_experts(base, pair["lora_A"], pair["lora_B"], scaling, layout)


def _expert_delta_layout(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> str | None:
    """peft's layout of a fused expert weight [E, out, in] ("eoi", transformers' MoE families)
    or [E, in, out] ("eio", modules marked ``is_transposed``), from the shapes of its adapter:
    A [E * r, in], B [out, E * r]; None if the pair does not fit. A square weight fits both and
    is taken as [E, out, in], the layout of every family aha supports (rl/moe/families.py)."""
    experts, first, second = base.shape
    if a.shape[0] != b.shape[1] or a.shape[0] % experts:
        return None
    if (b.shape[0], a.shape[1]) == (first, second):
        return "eoi"
    if (a.shape[1], b.shape[0]) == (first, second):
        return "eio"
    return None


def _merged_experts(
    base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, layout: str
) -> torch.Tensor:
    """``W + scaling * delta`` per expert, peft's ``ParamWrapper.get_delta_weight``: A [E*r, in]
    read as [E, r, in], B [out, E*r] as [out, r, E] (peft's interleaving, not [out, E, r])."""
    experts = base.shape[0]
    a3 = a.float().reshape(experts, -1, a.shape[-1])
    b3 = b.float().reshape(b.shape[0], -1, experts)
    delta = torch.einsum(f"ore,eri->{layout}", b3, a3) * scaling
    return (base.float() + delta).to(base.dtype)


def _lora_part(name: str) -> tuple[str, str | None]:
    """(module, "lora_A" or "lora_B") for an adapter matrix, peft's
    ``<module>.<kind>.<adapter>.weight``; (name, None) for anything else."""
    for kind in ("lora_A", "lora_B"):
        marker = f".{kind}."
        if marker in name and name.endswith(".weight"):
            return name.split(marker)[0], kind
    return name, None


def _merged(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    delta = (b.float() @ a.float()) * scaling  # [out, r] @ [r, in]
    return (base.float() + delta).to(base.dtype)
