"""The router patch of a mixture-of-experts policy: record, replay, measure.

``Routing.install`` puts one forward hook on every router of the policy (and of its reference
copy): the router's output, ``(router_logits, top_k_weights, top_k_index)`` in every family,
passes through ``_on_router``. What the hook does depends on the context the caller entered:

- ``record()`` (the transformers engine's generation): each layer's top-k of each forward is
  kept, so the engine can give each rollout the experts its tokens went to;
- ``forward(experts, mask)`` (every trainer forward: old, current and reference log-probs):
  the sampler's experts ``[b, s, L, K]`` for the forward's tokens. With ``replay`` (``rollout
  .routing_replay: r3``) each token goes to those experts instead of the router's own top-k, and
  the gate weights are the family's formula over the router's own logits at those experts (R3,
  arXiv 2510.11370), so the router keeps its gradient. Either way the hook counts how often the
  router's own top-k differs from the sampler's (``moe/router_mismatch``), how the tokens spread
  over the experts (``moe/expert_share``, ``moe/load_entropy``), and, with
  ``algorithm.router_aux_loss_coef`` > 0, keeps what the load-balancing loss needs.

Outside both contexts the hook does nothing: the model routes as transformers does.

Routing tensors hold expert indices; ``UNKNOWN`` (-1) marks a token whose sampler routing is not
known (padding, the last completion token, which the sampler never ran through the model,
rollouts from an engine that reports none): those tokens take the router's own top-k and are
not counted in the mismatch. Under gradient checkpointing the backward recomputes each layer's
forward after the context has closed: the replayed experts stay set until the next forward, so
the recomputation routes as the forward did (and is not counted twice).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from rl.moe.families import Family, routers
from rl.moe.stats import differing_choices, expert_counts, load_entropy, switch_balance_loss

UNKNOWN = -1
# Per-expert shares are logged as metrics up to this many (layer, expert) pairs; above it (a big
# model: 60 layers x 256 experts) only each layer's largest share and the load entropy.
MAX_SHARE_METRICS = 1024


def routing_dtype(num_experts: int) -> torch.dtype:
    """The smallest integer type a rollout's routing fits in: one byte per (layer, slot)."""
    return torch.uint8 if num_experts <= 256 else torch.int16


class Routing:
    """The router patch of one MoE policy; the trainer's ``moe``."""

    def __init__(
        self,
        family: Family,
        num_layers: int,
        num_experts: int,
        top_k: int,
        replay: bool = False,
        aux_loss_coef: float = 0.0,
    ):
        self.family = family
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.replay = replay
        self.aux_loss_coef = aux_loss_coef
        self.keep_for_backward = False  # gradient checkpointing: set by install
        self.layers: list[int] = []  # decoder layers with a router
        self._mode: str | None = None  # None, "record" or "forward"
        self._experts: torch.Tensor | None = None  # [N, L, K] long, UNKNOWN where not known
        self._mask: torch.Tensor | None = None  # [N] bool: real tokens
        self._measure = False
        self._seen: set[int] = set()  # layers already run in this forward
        self._recorded: dict[int, list[torch.Tensor]] = {}
        self._aux_terms: list[torch.Tensor] = []
        self._reset_counts()

    # ------------------------------------------------------------------ set-up

    def install(self, model: torch.nn.Module) -> None:
        """Hook every router of ``model`` (the policy, and a reference copy if there is one)."""
        found = routers(model, self.family)
        if not found:
            raise ValueError(f"no {self.family.router_class} in the model: nothing to route")
        self.layers = sorted({layer for layer, _ in found})
        if getattr(model, "is_gradient_checkpointing", False):
            self.keep_for_backward = True
        for layer, module in found:
            module.register_forward_hook(self._hook(layer))

    def _hook(self, layer: int):
        def hook(module, args, output):
            return self._on_router(layer, module, *output)

        return hook

    # ------------------------------------------------------------------ contexts

    @contextlib.contextmanager
    def record(self) -> Iterator[Recording]:
        """Keep each forward's top-k (generation with the trainer's own model)."""
        self._enter("record")
        self._recorded = {layer: [] for layer in self.layers}
        recording = Recording(self)
        try:
            yield recording
        finally:
            recording.calls = self._recorded
            self._recorded = {}
            self._leave(keep_experts=False)

    @contextlib.contextmanager
    def forward(
        self, experts: torch.Tensor | None, mask: torch.Tensor, measure: bool = True
    ) -> Iterator[None]:
        """One trainer forward of ``mask``'s tokens [b, s]; ``experts`` [b, s, L, K] the sampler's
        routing of them (or None). ``measure``: count mismatches and loads (not for the
        reference model's forwards)."""
        self._enter("forward")
        self._mask = mask.reshape(-1).bool()
        self._experts = None
        if experts is not None:
            self._experts = experts.reshape(-1, *experts.shape[-2:]).to(mask.device, torch.long)
        self._measure = measure
        try:
            yield
        finally:
            self._leave(keep_experts=True)

    def quiet(self) -> Quiet:
        """This routing for forwards that are not measured (the reference model's)."""
        return Quiet(self)

    def _enter(self, mode: str) -> None:
        if self._mode not in (None, "backward"):
            raise RuntimeError(f"moe routing: {mode} inside {self._mode}")
        self._mode, self._seen = mode, set()

    def _leave(self, keep_experts: bool) -> None:
        """Out of a context: the hook does nothing again, except under gradient checkpointing,
        where the replayed experts stay for the backward's recomputation of each layer."""
        self._measure = False
        if keep_experts and self.keep_for_backward and self._experts is not None:
            self._mode = "backward"
            return
        self._mode, self._experts, self._mask = None, None, None

    # ------------------------------------------------------------------ the hook

    def _on_router(self, layer: int, module, logits, weights, index):
        mode = self._mode
        if mode is None:
            return None
        if mode == "record":
            self._recorded[layer].append(index.detach())
            return None
        given = None
        if self._experts is not None:
            if self._experts.shape[0] != index.shape[0]:
                raise RuntimeError(
                    f"moe routing: {self._experts.shape[0]} tokens of routing for a forward of "
                    f"{index.shape[0]} tokens (layer {layer})"
                )
            given = self._experts[:, layer].to(index.device)  # [N, K]
        known = None if given is None else given[:, 0] >= 0  # [N]
        used = index
        if known is not None and self.replay and mode in ("forward", "backward"):
            used = torch.where(known.unsqueeze(1), given, index)
            weights = self.family.gates(module, logits, used, weights.dtype)
        if mode == "forward" and self._measure and layer not in self._seen:
            self._measure_layer(layer, module, logits, index, used, given, known)
        self._seen.add(layer)
        return logits, weights, used

    def _measure_layer(self, layer, module, logits, own, used, given, known) -> None:
        real = self._mask.to(own.device)
        if given is not None:
            counted = known & real
            differ = differing_choices(own, given) & counted
            self.mismatched += differ.sum().to(torch.float64).cpu()
            self.decisions += counted.sum().to(torch.float64).cpu()
        self.counts[layer] += expert_counts(used[real], self.num_experts).cpu()
        if self.aux_loss_coef > 0 and torch.is_grad_enabled():
            probs = self.family.probs(module, logits[real])
            self._aux_terms.append(switch_balance_loss(probs, used[real], self.num_experts))

    # ------------------------------------------------------------------ results

    def aux_loss(self) -> torch.Tensor | float:
        """``router_aux_loss_coef`` x the last training forward's load-balancing loss, averaged
        over its routed layers (0 when off); taken once."""
        terms, self._aux_terms = self._aux_terms, []
        if not terms:
            return 0.0
        return self.aux_loss_coef * torch.stack(terms).mean()

    def metrics(self, dist=None) -> dict[str, float]:
        """The step's MoE metrics, over all ranks, and the counters reset."""
        from rl.distributed import Distributed, gather_rows

        dist = dist or Distributed()
        packed = torch.cat([torch.stack([self.mismatched, self.decisions]), self.counts.flatten()])
        packed = gather_rows(dist, packed.unsqueeze(0)).sum(dim=0)
        mismatched, decisions = packed[0].item(), packed[1].item()
        counts = packed[2:].view(self.num_layers, self.num_experts)[self.layers]  # [L_moe, E]
        self._reset_counts()
        metrics: dict[str, float] = {}
        if decisions > 0:
            metrics["moe/router_mismatch"] = mismatched / decisions
        if counts.sum() == 0:
            return metrics
        entropy = load_entropy(counts)
        shares = counts / counts.sum(dim=-1, keepdim=True)
        metrics["moe/load_entropy/mean"] = entropy.nanmean().item()
        every_share = counts.numel() <= MAX_SHARE_METRICS
        for row, layer in enumerate(self.layers):
            metrics[f"moe/load_entropy/layer{layer:02d}"] = entropy[row].item()
            if every_share:
                for expert in range(self.num_experts):
                    key = f"moe/expert_share/layer{layer:02d}/e{expert:02d}"
                    metrics[key] = shares[row, expert].item()
            else:
                metrics[f"moe/max_expert_share/layer{layer:02d}"] = shares[row].max().item()
        return metrics

    def _reset_counts(self) -> None:
        self.mismatched = torch.zeros((), dtype=torch.float64)
        self.decisions = torch.zeros((), dtype=torch.float64)
        self.counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64)


class Quiet:
    """A routing whose forwards replay but do not measure (the reference model's)."""

    def __init__(self, routing: Routing):
        self.routing = routing

    def forward(self, experts, mask):
        return self.routing.forward(experts, mask, measure=False)


class Recording:
    """What ``Routing.record`` kept: each routed layer's top-k of each forward, in order."""

    def __init__(self, routing: Routing):
        self.routing = routing
        self.calls: dict[int, list[torch.Tensor]] = {}

    def call(self, number: int) -> torch.Tensor:
        """Forward ``number``'s routing [N, L, K] (layers without a router hold 0)."""
        routing = self.routing
        parts = {layer: calls[number] for layer, calls in self.calls.items()}
        rows = next(iter(parts.values())).shape[0]
        dtype = routing_dtype(routing.num_experts)
        out = torch.zeros(rows, routing.num_layers, routing.top_k, dtype=dtype)
        for layer, index in parts.items():
            out[:, layer] = index.cpu().to(dtype)
        return out

    def __len__(self) -> int:
        return min((len(c) for c in self.calls.values()), default=0)

    def rows(
        self,
        distinct: list[int],
        prompt_lengths: list[int],
        completion_lengths: list[int],
        width: int,
    ) -> list[torch.Tensor]:
        """Each row's routing [p + c - 1, L, K] from a recorded generation: forward 0 the
        prefill of the distinct prompts [U, width] (left-padded; ``distinct[row]`` is the row's
        prompt), then one forward per decode step of every row [B, 1]: step s ran completion
        token s. Row i holds positions 0 .. p + c - 2 of its prompt + completion (the last token
        is never run)."""
        prefill = self.call(0)
        prefill = prefill.view(-1, width, *prefill.shape[1:])  # [U, width, L, K]
        steps = [self.call(s) for s in range(1, len(self))]  # each [B, L, K]
        decoded = torch.stack(steps, dim=1) if steps else None  # [B, S, L, K]
        rows = []
        for row, (p, c) in enumerate(zip(prompt_lengths, completion_lengths, strict=True)):
            parts = [prefill[distinct[row], width - p :]]
            if c > 1:
                parts.append(decoded[row, : c - 1])
            rows.append(torch.cat(parts).contiguous())
        return rows
