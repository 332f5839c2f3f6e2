"""The transformers rollout engine: a lean sampling loop on the trainer's own model.

The fallback when vLLM is not installed, and the engine of the tiny-model tests. It samples
with the policy the trainer is updating, so weight sync is free: ``update_weights`` only
records the new policy version.

It does not call ``model.generate``: it runs the model's forward itself, token by token, with
the same sampling semantics (temperature, top-k, top-p as transformers' warpers; greedy gives
``generate``'s tokens, tested). What that buys, measured on SmolLM2-135M on the 2-core CPU (8
rows, 64 tokens, 2026-12-01), is mostly what ``generate`` cannot change from outside:

- each distinct prompt is prefilled once and its keys/values gathered for the group's rows;
- the cache has room for the whole completion (``RoomyLayer``) instead of concatenating, that
  is copying, every layer's cache at every step (~5 ms of a ~65 ms step);
- tokens are drawn by inverting the CDF, one uniform number per row, where
  ``torch.multinomial`` draws one exponential per vocabulary entry (~11 ms a step);
- on CPUs, MKL's packed weights for the decode steps' matrix products (rollouts/packed_linear.py,
  ~30% off the products, ~25% of the step).

Models loaded by ``rl.models.load_policy`` also pass grouped key/value heads to torch's attention
kernel on CPUs instead of copying them (``rl.models.cpu_sdpa_attention``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from rollouts import packed_linear
from rollouts.base import SamplingSettings
from rollouts.record import Prompt, Rollout
from rollouts.sampling import sample_next


class TransformersEngine:
    def __init__(self, model, tokenizer, batch_size: int = 64, routing=None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        # a mixture-of-experts policy's router patch (rl/moe/routing.py): each rollout gets the
        # experts its tokens were routed to (``Rollout.routed_experts``)
        self.routing = routing
        self.policy_version = 0
        # decode steps in MKL's packed weight layout on CPUs (rollouts/packed_linear.py)
        self.packed = packed_linear.PackedLinears() if packed_linear.available() else None

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], n: int, sampling: SamplingSettings) -> list[Rollout]:
        requests = [prompt for prompt in prompts for _ in range(n)]
        rollouts: list[Rollout] = []
        was_training = self.model.training
        self.model.eval()
        if self.packed is not None:
            self.packed.forget_trainable()
        try:
            for start in range(0, len(requests), self.batch_size):
                rollouts += self._generate_batch(
                    requests[start : start + self.batch_size], sampling
                )
        finally:
            self.model.train(was_training)
        return rollouts

    def _generate_batch(self, prompts: list[Prompt], sampling: SamplingSettings) -> list[Rollout]:
        tokenizer = self.tokenizer
        pad_id = tokenizer.pad_token_id
        width = max(len(p.ids) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):  # left padding: every completion starts at `width`
            input_ids[row, width - len(prompt.ids) :] = torch.tensor(prompt.ids)
            attention_mask[row, width - len(prompt.ids) :] = 1
        device = next(self.model.parameters()).device
        with self.routing.record() if self.routing else contextlib.nullcontext() as recording:
            new_ids, logps = self._decode(
                prompts, input_ids.to(device), attention_mask.to(device), sampling
            )
        new_ids, logps = new_ids.cpu(), logps.cpu()  # [B, T]
        ends = [  # a prompt's own cap (a multi-turn trajectory's budget) cuts its rows
            self._completion_length(ids[: _own_cap(p, sampling)], sampling)
            for p, ids in zip(prompts, new_ids.tolist(), strict=True)
        ]
        routed = [None] * len(prompts)
        if recording is not None:
            routed = recording.rows(
                _distinct_rows(prompts),
                [len(p.ids) for p in prompts],
                [length for length, _ in ends],
                width,
            )
        rollouts = []
        for row, prompt in enumerate(prompts):
            ids = new_ids[row].tolist()[: _own_cap(prompt, sampling)]
            length, finish = ends[row]
            completion_ids = ids[:length]
            rollouts.append(
                Rollout(
                    prompt=prompt,
                    completion_ids=completion_ids,
                    completion=tokenizer.decode(completion_ids, skip_special_tokens=True),
                    sampler_logps=logps[row, :length].tolist(),
                    finish_reason=finish,
                    policy_version=self.policy_version,
                    routed_experts=routed[row],
                )
            )
        return rollouts

    def _decode(
        self,
        prompts: list[Prompt],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        sampling: SamplingSettings,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled tokens [B, T] (the end token, then padding, after a row ends) and their
        log-probs under the sampler's distribution [B, T], T <= ``max_tokens``.

        transformers' decode loop without its per-step machinery (logits processors, stopping
        criteria, a [B, V] score kept per step): prefill, then one forward of the new tokens per
        step until every row has ended (what it does differently: the module docstring).
        Position ids count each row's real tokens, as ``generate`` numbers left-padded prompts.

        input_ids, attention_mask [B, P] (left-padded)
        """
        model, eos, pad = self.model, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        size = len(prompts)
        caps = [_own_cap(p, sampling) for p in prompts]  # a prompt may cap its rows lower
        longest = max(caps)
        caps = torch.tensor(caps, device=input_ids.device)  # [B]
        cache, logits = self._prefill(prompts, input_ids, attention_mask)
        reserve_room(cache, longest)
        next_position = attention_mask.sum(dim=1)  # [B] position id of each row's next token
        ended = torch.zeros(size, dtype=torch.bool, device=input_ids.device)
        tokens, logps = [], []
        with self.packed(model, size) if self.packed else contextlib.nullcontext():
            for step in range(longest):
                token, logp = sample_next(
                    logits, sampling.temperature, sampling.top_k, sampling.top_p
                )
                token = token.masked_fill(ended, pad)  # [B]
                tokens.append(token)
                logps.append(logp.masked_fill(ended, 0.0))
                ended |= token == eos
                if sampling.stop:
                    ended |= self._stop_string_ended(tokens, ended, sampling.stop)
                ended |= caps <= step + 1
                if step + 1 == longest or bool(ended.all()):
                    break
                attention_mask = torch.cat(
                    [attention_mask, attention_mask.new_ones(size, 1)], dim=1
                )
                logits = model(
                    input_ids=token.unsqueeze(1),
                    attention_mask=attention_mask,
                    position_ids=(next_position + step).unsqueeze(1),
                    past_key_values=cache,
                    use_cache=True,
                ).logits[:, -1]
        if not tokens:
            return input_ids.new_zeros(size, 0), torch.zeros(size, 0)
        return torch.stack(tokens, dim=1), torch.stack(logps, dim=1).float()

    def _prefill(self, prompts: list[Prompt], input_ids, attention_mask):
        """The cache after the prompts, and the logits [B, V] of each row's first new token. A
        group's G copies of a prompt run once; their keys and values are gathered per row."""
        rows = _distinct_rows(prompts)  # row -> distinct prompt
        device = input_ids.device
        distinct = torch.tensor([rows.index(k) for k in range(max(rows) + 1)], device=device)
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # [B, P]
        cache = DynamicCache()
        logits = self.model(
            input_ids=input_ids[distinct],
            attention_mask=attention_mask[distinct],
            position_ids=positions[distinct],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]  # [U, V]
        if len(distinct) < len(prompts):
            select = torch.tensor(rows, device=device)
            cache.batch_select_indices(select)
            logits = logits[select]  # [B, V]
        return cache, logits

    def _stop_string_ended(
        self, tokens: list[torch.Tensor], ended: torch.Tensor, stop: tuple[str, ...]
    ) -> torch.Tensor:
        """[B] rows whose latest tokens complete a stop string. Only a short tail is decoded: a
        string of n characters spans at most 4n tokens (byte tokens of one UTF-8 character)."""
        window = 4 * max(len(s) for s in stop) + 4
        recent = torch.stack(tokens[-window:], dim=1).tolist()  # [B, <=window]
        hits = [
            not done and any(s in self.tokenizer.decode(ids) for s in stop)
            for ids, done in zip(recent, ended.tolist(), strict=True)
        ]
        return torch.tensor(hits, device=ended.device)

    def _completion_length(self, ids: list[int], sampling: SamplingSettings) -> tuple[int, str]:
        """Tokens up to and including the end token (it is trained on too), and why it ended."""
        eos = self.tokenizer.eos_token_id
        if eos in ids:
            return ids.index(eos) + 1, "stop"
        if sampling.stop:
            text = ""
            for i, token in enumerate(ids):
                text += self.tokenizer.decode([token])
                if any(s in text for s in sampling.stop):
                    return i + 1, "stop"
        return len(ids), "length"

    def release_memory(self) -> None:
        pass  # it generates with the trainer's own model: nothing of its own to free

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        # the same model object as the trainer's: nothing to copy, nothing drawn
        self.policy_version = version

    def close(self) -> None:
        pass


def _distinct_rows(prompts: list[Prompt]) -> list[int]:
    """Each row's distinct prompt, numbered in order of first appearance (a group's G rows share
    one prompt object)."""
    first: dict[int, int] = {}
    return [first.setdefault(id(p), len(first)) for p in prompts]


def _own_cap(prompt: Prompt, sampling: SamplingSettings) -> int:
    """The most new tokens for ``prompt``: its own cap, never above the settings'."""
    if prompt.max_tokens is None:
        return sampling.max_tokens
    return max(0, min(prompt.max_tokens, sampling.max_tokens))


class RoomyLayer(DynamicLayer):
    """A full-attention layer of a ``DynamicCache`` with room for ``room`` more tokens: a decode
    step writes its keys and values into the room, where transformers' layer concatenates,
    copying the whole cache of every layer at every step (about 5 ms a step for SmolLM2-135M at
    130 tokens, a tenth of the step on a CPU). Out of room, it concatenates as ever."""

    def __init__(self, layer: DynamicLayer, room: int):
        super().__init__()
        length = layer.keys.shape[-2]
        # keys and values may differ in width (DeepSeek-V3's latent attention: 192 and 128)
        rows = (*layer.keys.shape[:-2], length + room)
        self.key_room = layer.keys.new_empty((*rows, layer.keys.shape[-1]))
        self.value_room = layer.values.new_empty((*rows, layer.values.shape[-1]))
        self.key_room[..., :length, :] = layer.keys
        self.value_room[..., :length, :] = layer.values
        self.dtype, self.device, self.is_initialized = layer.dtype, layer.device, True
        self.keys, self.values = self.key_room[..., :length, :], self.value_room[..., :length, :]

    def update(self, key_states, value_states, *args, **kwargs):
        start, end = self.keys.shape[-2], self.keys.shape[-2] + key_states.shape[-2]
        if end > self.key_room.shape[-2]:
            return super().update(key_states, value_states, *args, **kwargs)
        self.key_room[..., start:end, :] = key_states
        self.value_room[..., start:end, :] = value_states
        self.keys, self.values = self.key_room[..., :end, :], self.value_room[..., :end, :]
        return self.keys, self.values


def reserve_room(cache, tokens: int) -> None:
    """Room for ``tokens`` more in each full-attention layer of ``cache`` (other layer kinds,
    sliding-window ones and the like, are left as they are)."""
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.dim() == 4:
            cache.layers[index] = RoomyLayer(layer, tokens)
