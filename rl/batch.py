"""From rollout records to padded tensors, and per-token log-probs of completions."""

from __future__ import annotations

import contextlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from rollouts.record import Rollout


@dataclass
class TokenBatch:
    """Rollouts as tensors. Prompts are left-padded and completions right-padded, so every
    completion starts at column ``prompt_width`` and the completion region is the last T columns."""

    input_ids: torch.Tensor  # [B, P+T]
    attention_mask: torch.Tensor  # [B, P+T]
    completion_mask: torch.Tensor  # [B, T] 1 on completion tokens
    advantages: torch.Tensor  # [B], or [B, T] per token
    sampler_logps: torch.Tensor | None  # [B, T] the rollout engine's, 0 where masked
    prompt_width: int
    # Filled by the trainer before the first update, once per generation batch, when needed:
    old_logps: torch.Tensor | None = None  # [B, T] behaviour policy (None: on-policy, use current)
    ref_logps: torch.Tensor | None = None  # [B, T] reference policy (None: beta == 0)
    group_ids: torch.Tensor | None = None  # [B] the prompt's group: rows with one prompt share it
    # Mixture of experts: the sampler's experts for each token and layer, [B, P+T, L, K] int16,
    # -1 where not known (padding, each completion's last token); None for dense policies
    routed_experts: torch.Tensor | None = None
    teacher_logps: torch.Tensor | None = None  # [B, T] on-policy distillation's teacher

    @property
    def completion_width(self) -> int:
        return self.completion_mask.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: list[int] | torch.Tensor) -> TokenBatch:
        """A micro-batch, trimmed to its own widest prompt and completion."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        attention = self.attention_mask[rows]
        completion_mask = self.completion_mask[rows]
        prompt_lengths = attention[:, : self.prompt_width].sum(dim=1)
        cut_left = self.prompt_width - int(prompt_lengths.max())
        keep_right = last_masked_column(completion_mask)
        end = self.prompt_width + keep_right
        return TokenBatch(
            input_ids=self.input_ids[rows, cut_left:end],
            attention_mask=attention[:, cut_left:end],
            completion_mask=completion_mask[:, :keep_right],
            advantages=_advantage_rows(self.advantages, rows, keep_right),
            sampler_logps=_rows(self.sampler_logps, rows, keep_right),
            prompt_width=self.prompt_width - cut_left,
            old_logps=_rows(self.old_logps, rows, keep_right),
            ref_logps=_rows(self.ref_logps, rows, keep_right),
            group_ids=None if self.group_ids is None else self.group_ids[rows],
            routed_experts=(
                None if self.routed_experts is None else self.routed_experts[rows, cut_left:end]
            ),
            teacher_logps=_rows(self.teacher_logps, rows, keep_right),
        )


def on_device(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A host tensor on ``device`` (None stays None). To a GPU it goes from pinned memory
    without waiting: torch's plain copy from pageable memory synchronises the stream, so each
    input of a micro-batch would wait for the previous micro-batch's backward to finish before
    the host could queue the next forward. (The pinned block is not reused before its copy has
    run.)"""
    if tensor is None:
        return None
    if torch.device(device).type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _rows(values: torch.Tensor | None, rows: torch.Tensor, width: int) -> torch.Tensor | None:
    return None if values is None else values[rows, :width]


def _advantage_rows(advantages: torch.Tensor, rows: torch.Tensor, width: int) -> torch.Tensor:
    return advantages[rows] if advantages.dim() == 1 else advantages[rows, :width]


def last_masked_column(mask: torch.Tensor) -> int:
    """Columns up to the last one with a 1 in any row (at least 1): a multi-turn row's mask has
    zeros (the environment's tokens) between its ones, so its count is not its width.

    mask [B, T] -> int
    """
    columns = torch.arange(1, mask.shape[1] + 1)
    return int((columns * (mask > 0)).max().clamp(min=1)) if mask.numel() else 1


def collate(rollouts: list[Rollout], pad_id: int, mask_truncated: bool = False) -> TokenBatch:
    prompt_width = max(len(r.prompt.ids) for r in rollouts)
    completion_width = max(max(len(r.completion_ids) for r in rollouts), 1)
    size = len(rollouts)
    input_ids = torch.full((size, prompt_width + completion_width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros(size, completion_width)
    has_sampler_logps = all(r.sampler_logps is not None for r in rollouts)
    sampler_logps = torch.zeros(size, completion_width) if has_sampler_logps else None
    for row, rollout in enumerate(rollouts):
        p, c = len(rollout.prompt.ids), len(rollout.completion_ids)
        input_ids[row, prompt_width - p : prompt_width] = torch.tensor(rollout.prompt.ids)
        input_ids[row, prompt_width : prompt_width + c] = torch.tensor(
            rollout.completion_ids, dtype=torch.long
        )
        attention_mask[row, prompt_width - p : prompt_width + c] = 1
        if not (mask_truncated and rollout.truncated):
            # the model's tokens only: a multi-turn rollout's environment tokens are context
            completion_mask[row, :c] = (
                1 if rollout.model_mask is None else torch.tensor(rollout.model_mask)
            )
        if sampler_logps is not None:
            sampler_logps[row, :c] = torch.tensor(rollout.sampler_logps)
    advantages = torch.tensor([r.advantage for r in rollouts], dtype=torch.float32)
    group_ids = prompt_ids_groups(rollouts)
    return TokenBatch(
        input_ids,
        attention_mask,
        completion_mask,
        advantages,
        sampler_logps,
        prompt_width,
        group_ids=group_ids,
        routed_experts=collate_routing(rollouts, prompt_width, input_ids.shape[1]),
    )


def collate_routing(rollouts: list[Rollout], prompt_width: int, width: int):
    """The rollouts' routed experts [B, P+T, L, K] (int16, -1 where not known) aligned with
    ``collate``'s columns; None when no rollout has any."""
    shapes = [r.routed_experts.shape[1:] for r in rollouts if r.routed_experts is not None]
    if not shapes:
        return None
    routed = torch.full((len(rollouts), width, *shapes[0]), -1, dtype=torch.int16)
    for row, rollout in enumerate(rollouts):
        if rollout.routed_experts is not None:
            start = prompt_width - len(rollout.prompt.ids)
            experts = torch.as_tensor(rollout.routed_experts).to(torch.int16)
            routed[row, start : start + len(experts)] = experts
    return routed


def prompt_ids_groups(rollouts: list[Rollout]) -> torch.Tensor:
    """One id per distinct prompt [B]: rows share one when they share the group and the prompt's
    tokens (an environment's reset text can make a group's prompts differ), so the shared-prompt
    forward runs each distinct prompt once and never gives a row another row's prompt."""
    ids: dict[tuple[int, tuple[int, ...]], int] = {}
    keys = [(r.group, tuple(r.prompt.ids)) for r in rollouts]
    return torch.tensor([ids.setdefault(key, len(ids)) for key in keys], dtype=torch.long)


def completion_logps(
    model,
    batch: TokenBatch,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int = 0,
    share_prompts: bool = False,
    routing=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each completion token under ``model`` at the sampling temperature, and the
    entropy of each next-token distribution.

    Position ids follow the attention mask, exactly as generate() numbers left-padded prompts.
    With ``chunk_tokens`` > 0 the model stops at its last hidden states and the output layer,
    log-softmax and gather run ``chunk_tokens`` real completion tokens at a time, each chunk
    recomputed in backward (activation checkpointing): float32 logits exist for one chunk only,
    [chunk_tokens, V], never [B, T, V], and padding costs nothing. With 0 only the logits of the
    completion region are materialised (``logits_to_keep``), all at once.

    With ``share_prompts``, rows of one group (same prompt) run their prompt once: its keys and
    values are computed with grad for one row and gathered for the others (the gradient of the
    gather sums the group's contributions), then the completions run on top. With G completions
    per prompt this removes (G-1)/G of the prompt tokens' forward and backward. Not used under
    gradient checkpointing (which forbids a cache in training).

    ``routing`` (a mixture-of-experts policy's, rl/moe/routing.py) is entered around each model
    call with the batch's routed experts for exactly that call's tokens: the sampler's routing
    is replayed (or compared with the router's own) whichever path runs.

    returns logps [B, T] and entropy [B, T] (or None)
    """
    device = next(model.parameters()).device
    input_ids = on_device(batch.input_ids, device)
    attention_mask = on_device(batch.attention_mask, device)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    width = batch.completion_width
    targets = input_ids[:, -width:]  # [B, T]
    inputs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=width + 1,
        use_cache=False,
    )
    shared = _shared_prompts(model, batch) if share_prompts else None
    output_layer = _plain_output_layer(model) if chunk_tokens > 0 else None
    if output_layer is None:
        if shared is not None:
            logits = _shared_prompt_forward(
                model, batch, input_ids, attention_mask, *shared, routing=routing
            )
        else:
            with _routed(routing, batch.routed_experts, attention_mask):
                logits = model(**inputs).logits[:, :-1, :]  # [B, T, V]: t predicts token t
        return _token_logps(logits, targets, temperature, with_entropy)

    with _output_layer_skipped(model, output_layer):
        if shared is not None:
            hidden = _shared_prompt_forward(
                model, batch, input_ids, attention_mask, *shared, routing=routing
            )
        else:
            with _routed(routing, batch.routed_experts, attention_mask):
                hidden = model(**inputs).logits[:, :-1, :]  # [B, T, H]: the output layer's input
    # The completion tokens (not padding), as flat positions in [B, T] taken from the host's
    # mask: indexing with the device's boolean mask would wait for the device to count them.
    real = on_device(batch.attention_mask[:, -width:].reshape(-1).nonzero().squeeze(1), device)
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, real)  # [N, H]
    flat_targets = targets.reshape(-1).index_select(0, real)  # [N]
    parts, entropies = [], []
    # One chunk holds its logits for backward (no bigger than a chunk's own peak); with several,
    # each keeps only its [n, H] input and recomputes its [n, V] logits in backward.
    recompute = torch.is_grad_enabled() and hidden.requires_grad and len(hidden) > chunk_tokens
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, t = hidden[start : start + chunk_tokens], flat_targets[start : start + chunk_tokens]
        if recompute:
            part, ent = torch.utils.checkpoint.checkpoint(
                _chunk_logps, output_layer, h, t, temperature, with_entropy, use_reentrant=False
            )
        else:
            part, ent = _chunk_logps(output_layer, h, t, temperature, with_entropy)
        parts.append(part)
        entropies.append(ent)
    return _scattered(parts, real, targets.shape, device), (
        _scattered(entropies, real, targets.shape, device) if with_entropy else None
    )


def _routed(routing, experts: torch.Tensor | None, attention_mask: torch.Tensor):
    """The routing context of one model call over ``attention_mask``'s tokens [b, s], with their
    routed experts [b, s, L, K] (or None); nothing without a routing."""
    if routing is None:
        return contextlib.nullcontext()
    return routing.forward(experts, attention_mask)


def _scattered(parts: list[torch.Tensor], positions: torch.Tensor, shape, device) -> torch.Tensor:
    """The chunks' values [N] at their flat positions of a zero [B, T] tensor (float32)."""
    flat = torch.zeros(shape.numel(), dtype=torch.float32, device=device)
    if parts:
        flat = flat.index_copy(0, positions, torch.cat(parts))
    return flat.view(shape)


def _shared_prompts(model, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(one row per distinct prompt [U], each row's prompt [B]), or None when nothing is shared
    or the model cannot run on a shared cache."""
    if batch.group_ids is None or batch.prompt_width == 0:
        return None
    if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        return None
    groups, inverse = torch.unique(batch.group_ids, return_inverse=True)  # [U], [B]
    if len(groups) == len(batch):
        return None
    first_rows = torch.full((len(groups),), len(batch), dtype=torch.long)
    first_rows = first_rows.scatter_reduce(0, inverse, torch.arange(len(batch)), reduce="amin")
    return first_rows, inverse


def forward_tokens(model, batch: TokenBatch, share_prompts: bool = False) -> int:
    """The real (not padding) tokens ``completion_logps`` runs through the model for ``batch``:
    every completion token, and each prompt's tokens once per row, or once per group when the
    prompts are shared. What the model FLOPs of MFU count (6 x parameters per trained token)."""
    width = batch.prompt_width
    prompt_lengths = batch.attention_mask[:, :width].sum(dim=1)  # [B]
    completion_tokens = int(batch.attention_mask[:, width:].sum())
    shared = _shared_prompts(model, batch) if share_prompts else None
    if shared is not None:
        first_rows, _ = shared
        prompt_lengths = prompt_lengths[first_rows]  # [U]
    return completion_tokens + int(prompt_lengths.sum())


def _shared_prompt_forward(
    model,
    batch: TokenBatch,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    first_rows: torch.Tensor,
    inverse: torch.Tensor,
    routing=None,
) -> torch.Tensor:
    """The model's outputs at the positions that predict completion tokens, [B, T, X], the
    prompts run once per group. X is the vocabulary, or the hidden size with the output layer
    skipped."""
    from transformers import DynamicCache

    width, device = batch.prompt_width, input_ids.device
    first_rows, inverse = on_device(first_rows, device), on_device(inverse, device)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    # One embedding lookup for both calls: its backward writes a [V, H] gradient of the whole
    # table (zeroed, filled, then added to the output layer's when they are tied), once not
    # twice. Not with sharded weights: the table is gathered by the model's own forward.
    embedding = model.get_input_embeddings()
    if type(embedding.weight) is torch.nn.Parameter and not hasattr(embedding.weight, "ds_id"):
        embeddings = embedding(input_ids)  # [B, P+T, H]
        prompt_inputs = {"inputs_embeds": embeddings[first_rows, :width]}
        completion_inputs = {"inputs_embeds": embeddings[:, width:]}
    else:
        prompt_inputs = {"input_ids": input_ids[first_rows, :width]}
        completion_inputs = {"input_ids": input_ids[:, width:]}
    routed = batch.routed_experts
    prompt_routing = None if routed is None else routed[first_rows.cpu(), :width]
    with _routed(routing, prompt_routing, attention_mask[first_rows, :width]):
        prompt = model(
            **prompt_inputs,
            attention_mask=attention_mask[first_rows, :width],
            position_ids=position_ids[first_rows, :width],
            past_key_values=DynamicCache(),
            use_cache=True,
            logits_to_keep=1,  # the last prompt position predicts the first completion token
        )
    cache = prompt.past_key_values
    cache.batch_select_indices(inverse)  # [U, ...] -> [B, ...], differentiable
    completion_routing = None if routed is None else routed[:, width:]
    with _routed(routing, completion_routing, attention_mask[:, width:]):
        completion = model(
            **completion_inputs,
            attention_mask=attention_mask,
            position_ids=position_ids[:, width:],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=0,  # all
        )
    first = prompt.logits[inverse]  # [B, 1, X]
    return torch.cat([first, completion.logits[:, :-1]], dim=1)  # [B, T, X]


def _token_logps(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [..., V], targets [...] -> log-probs [...], entropy [...] (or None), in float32."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if not torch.is_grad_enabled() or not logits.requires_grad:
        log_norm = torch.logsumexp(logits, dim=-1)  # [...]
        logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
        return logps, _entropy(logits, log_norm) if with_entropy else None
    logps, entropy = TokenLogProbs.apply(logits, targets)
    return logps, entropy if with_entropy else None


def _entropy(logits: torch.Tensor, log_norm: torch.Tensor, probs: torch.Tensor | None = None):
    """H = log Z - sum_v p_v * logit_v. (Not as a batched dot product: MKL's float32 one is off
    by 1e-3 over a 49k vocabulary, the plain sum by 2e-5.)"""
    if probs is None:
        probs = torch.exp(logits - log_norm.unsqueeze(-1))
    return log_norm - (probs * logits).sum(dim=-1)


class TokenLogProbs(torch.autograd.Function):
    """log softmax(logits)[target] with its gradient made from the probabilities, the one
    [..., V] tensor kept for backward: d logp / d logits = onehot(target) - p. Autograd's own
    logsumexp and gather would keep the logits and, in backward, make exp(logits - log Z), the
    gather's scattered zeros and their sum, three more passes over [..., V] (for SmolLM2's 49k
    vocabulary, 100 MB each per 512 tokens). The entropy comes free from the same probabilities
    (no gradient: it is logged, not trained on).

    logits [..., V] float, targets [...] long -> logps [...], entropy [...]
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor):
        log_norm = torch.logsumexp(logits, dim=-1)
        logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
        probs = torch.exp(logits - log_norm.unsqueeze(-1))
        entropy = _entropy(logits, log_norm, probs)
        ctx.save_for_backward(probs, targets)
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor, _grad_entropy):
        probs, targets = ctx.saved_tensors
        grad = probs * -grad_logps.unsqueeze(-1)  # [..., V]
        grad.scatter_add_(-1, targets.unsqueeze(-1), grad_logps.unsqueeze(-1))
        return grad, None


def _chunk_logps(output_layer, hidden, targets, temperature: float, with_entropy: bool):
    logps, entropy = _token_logps(output_layer(hidden), targets, temperature, with_entropy)
    return logps, entropy if entropy is not None else torch.zeros_like(logps)


def _plain_output_layer(model) -> torch.nn.Module | None:
    """The output layer when logits are exactly output_layer(last hidden state); None for models
    that scale or soft-cap logits after it (Gemma 2, Cohere): those take the plain path."""
    config = getattr(model, "config", None)
    if config is None or any(
        getattr(config, name, None) not in (None, 1, 1.0)
        for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")
    ):
        return None
    return model.get_output_embeddings()


@contextmanager
def _output_layer_skipped(model, output_layer: torch.nn.Module):
    """The model's forward with the output layer replaced by identity: its "logits" are the last
    hidden states. The module is swapped (not its weights), so tied embeddings are untouched."""
    parent, name = next(
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if child is output_layer
    )
    setattr(parent, name, torch.nn.Identity())
    try:
        yield
    finally:
        setattr(parent, name, output_layer)


@torch.no_grad()
def logps_in_chunks(
    model,
    batch: TokenBatch,
    chunk_size: int,
    temperature: float,
    chunk_tokens: int = 0,
    share_prompts: bool = False,
    routing=None,
) -> torch.Tensor:
    """``completion_logps`` of the whole batch without grad, ``chunk_size`` sequences at a time
    (each chunk trimmed to its own width); for old and reference log-probs.

    returns logps [B, T] (on the CPU, 0 beyond each chunk's width; copied from the device once)
    """
    device = next(model.parameters()).device
    out = torch.zeros(len(batch), batch.completion_width, device=device)
    for start in range(0, len(batch), chunk_size):
        rows = list(range(start, min(start + chunk_size, len(batch))))
        micro = batch.select(rows)
        logps = completion_logps(
            model, micro, temperature, False, chunk_tokens, share_prompts, routing
        )[0]
        out[start : start + len(rows), : logps.shape[1]] = logps.float()
    return out.cpu()
