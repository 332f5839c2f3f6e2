"""The transformers rollout engine: `model.generate` on the trainer's own model.

The fallback when vLLM is not installed, and the engine of the tiny-model tests. It samples
with the policy the trainer is updating, so weight sync is free: ``update_weights`` only
records the new policy version.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import GenerationConfig

from rollouts.base import SamplingSettings
from rollouts.record import Prompt, Rollout


class TransformersEngine:
    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.policy_version = 0

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], n: int, sampling: SamplingSettings) -> list[Rollout]:
        requests = [prompt for prompt in prompts for _ in range(n)]
        rollouts: list[Rollout] = []
        was_training = self.model.training
        self.model.eval()
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
        greedy = sampling.temperature == 0  # evaluation
        config = GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else sampling.top_k,  # 0 = off; None would mean 50
            max_new_tokens=sampling.max_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad_id,
            stop_strings=list(sampling.stop) or None,
            output_scores=True,  # the logits after temperature/top-k/top-p: the sampler's distribution
            return_dict_in_generate=True,
            use_cache=True,
        )
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            tokenizer=tokenizer if sampling.stop else None,
            past_key_values=self._shared_prefill(prompts, input_ids, attention_mask),
        )
        new_ids = output.sequences[:, width:].cpu()  # [B, T]
        scores = torch.stack(output.scores, dim=1).float()  # [B, T, V]
        logps = (
            torch.log_softmax(scores, dim=-1).gather(-1, new_ids.unsqueeze(-1)).squeeze(-1).cpu()
        )  # [B, T]
        rollouts = []
        for row, prompt in enumerate(prompts):
            ids = new_ids[row].tolist()
            length, finish = self._completion_length(ids, sampling)
            completion_ids = ids[:length]
            rollouts.append(
                Rollout(
                    prompt=prompt,
                    completion_ids=completion_ids,
                    completion=tokenizer.decode(completion_ids, skip_special_tokens=True),
                    sampler_logps=logps[row, :length].tolist(),
                    finish_reason=finish,
                    policy_version=self.policy_version,
                )
            )
        return rollouts

    def _shared_prefill(self, prompts: list[Prompt], input_ids, attention_mask):
        """A group's G copies of a prompt, prefilled once: the keys and values of all but the
        last prompt token, computed per distinct prompt and gathered for every row (generate()
        then runs the last prompt token and samples). None when no prompt repeats."""
        from transformers import DynamicCache

        first: dict[int, int] = {}
        rows = [first.setdefault(id(p), len(first)) for p in prompts]  # row -> distinct prompt
        if len(first) == len(prompts) or input_ids.shape[1] < 2:
            return None
        device = input_ids.device
        distinct = torch.tensor([rows.index(k) for k in range(len(first))], device=device)
        mask = attention_mask[distinct, :-1]
        cache = DynamicCache()
        self.model(
            input_ids=input_ids[distinct, :-1],
            attention_mask=mask,
            position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache.batch_select_indices(torch.tensor(rows, device=device))
        return cache

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

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        self.policy_version = version  # same model object as the trainer's: nothing to copy

    def close(self) -> None:
        pass
