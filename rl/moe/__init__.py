"""Mixture-of-experts policies, with the sampler's routing replayed in the trainer.

- ``families``: the MoE model types aha trains (Mixtral, Qwen3-MoE, OLMoE, DeepSeek-V3) and what
  each router does; any other MoE type is refused with the reason;
- ``routing``: the router patch installed once at set-up (``install``): it records the experts
  the transformers engine routes each token to, replays the sampler's experts in the trainer's
  forwards (``rollout.routing_replay: r3``), measures the trainer/sampler disagreement and the
  experts' load, and adds the load-balancing loss when asked;
- ``stats``: the pure tensor functions behind those numbers;
- ``policy``: what set-up asks of a MoE policy (its router patch, LoRA targets, and the
  checkpoint layout its fused expert tensors go to vLLM in);
- ``tiny``, ``upcycle``: the tiny random MoE models of the tests, and the upcycled SmolLM2.

The training step never asks which family runs: the forward helpers (``rl/batch.py``) enter the
routing context chosen at set-up around each forward, with the batch's routed experts.
"""
