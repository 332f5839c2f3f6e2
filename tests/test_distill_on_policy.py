"""On-policy distillation (algorithm.teacher): the reverse-KL advantage and per-token
advantages in every policy loss, by hand; the tokenizer check; the config's refusals; 2-step
runs on the tiny model (pure distillation, with a rule reward, a LoRA run as teacher); a
teacher on a (stand-in) vLLM server scores as the local one does."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import FIXTURES, ROOT
from safetensors.torch import load_file
from stand_ins import JsonServer

from rl.algorithms import POLICY_LOSSES, TEACHER_ADVANTAGES, objective
from rl.config import ConfigError, load_config

TINY = str(ROOT / "configs" / "tiny.yaml")
DIGITS = f"rewards=[{{name: '{FIXTURES / 'plugin_rewards.py'}:digit_count', weight: 1.0}}]"


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# ------------------------------------------------------------------ the advantage, by hand


def test_reverse_kl_advantage_by_hand():
    """A_t = A - coef * (logp_t - teacher_logp_t), coef 0.5:
    row 0 (A = 1):    1 - 0.5 * (-1 - -1.5) = 0.75,  1 - 0.5 * (-2 - -1) = 1.5
    row 1 (A = -0.5): -0.5 - 0.5 * 0 = -0.5,          -0.5 - 0.5 * (-3 - -4) = -1.0"""
    advantages = t(1.0, -0.5)
    logps = t([-1.0, -2.0], [-0.5, -3.0])
    teacher = t([-1.5, -1.0], [-0.5, -4.0])
    got = TEACHER_ADVANTAGES["reverse_kl"](advantages, logps, teacher, 0.5)
    assert torch.equal(got, t([0.75, 1.5], [-0.5, -1.0]))  # exact in binary: halves, quarters
    # per-token advantages in: the teacher's term is added token by token
    assert torch.equal(TEACHER_ADVANTAGES["reverse_kl"](got, logps, logps, 0.5), got)
    # no gradient flows through an advantage
    logps.requires_grad_(True)
    assert not TEACHER_ADVANTAGES["reverse_kl"](advantages, logps, teacher, 0.5).requires_grad


def test_objective_with_a_teacher_by_hand():
    """On-policy (old = current), clip, seq_mean_token_mean, coef 1: per-token advantages
    A_t = 0 - (logp_t - teacher_t) = [0.5, -1] on row 0's two tokens (the third is padding),
    ratio 1, so loss = -mean_t A_t = -(0.5 - 1) / 2 = 0.25 over one sequence; d loss / d logp_t
    = -A_t / 2. The metrics: the mean reverse KL over real tokens (-0.5 + 1) / 2 = 0.25 and the
    teacher's mean log-prob (-1.5 - 1.5) / 2 = -1.5 (the padding's -1 left out)."""
    logps = torch.tensor([[-2.0, -0.5, -7.0]], dtype=torch.float64, requires_grad=True)
    teacher = t([-1.5, -1.5, -1.0])
    mask = t([1, 1, 0])
    loss, stats = objective(
        logps,
        logps.detach(),
        t(0.0),
        mask,
        policy_loss="clip",
        aggregation="seq_mean_token_mean",
        num_sequences=1,
        num_tokens=2,
        max_completion_length=3,
        epsilon_low=0.2,
        epsilon_high=0.2,
        teacher_logps=teacher,
        teacher_coef=1.0,
    )
    loss.backward()
    assert loss.item() == pytest.approx(0.25)
    assert torch.allclose(logps.grad, t([-0.25, 0.5, 0.0]))
    assert stats["distill/reverse_kl"].item() == pytest.approx(0.25)
    assert stats["distill/teacher_logp"].item() == pytest.approx(-1.5)


@pytest.mark.parametrize("name", ["clip", "gspo", "cispo"])
def test_per_token_advantages_equal_to_the_sequences_change_nothing(name):
    """[B] advantages and the same values broadcast to [B, T] give the same loss and gradient
    in every policy loss (gspo: GSPO-token equals GSPO then, Zheng et al. 2025 eq. 14)."""
    torch.manual_seed(0)
    old = -torch.rand(3, 4, dtype=torch.float64)
    current = old + 0.1 * torch.randn(3, 4, dtype=torch.float64)
    mask = t([1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0])
    advantages = t(1.0, -0.5, 2.0)
    hyper = {"epsilon_low": 0.2, "epsilon_high": 0.28, "clip_ratio_c": 3.0}
    results = []
    for adv in (advantages, advantages.unsqueeze(1).expand(3, 4)):
        logps = current.clone().requires_grad_(True)
        loss, _ = POLICY_LOSSES[name](logps, old, adv, mask, **hyper)
        (loss * mask).sum().backward()
        results.append(((loss * mask).detach(), logps.grad))
    # float64, a dozen operations on numbers near 1: agreement to ~1e-15; 1e-12 is loose
    assert torch.allclose(results[0][0], results[1][0], rtol=0, atol=1e-12)
    assert torch.allclose(results[0][1], results[1][1], rtol=0, atol=1e-12)


def test_gspo_token_by_hand():
    """GSPO-token: the ratio's value is the sequence's s = exp((0.1 + 0.3) / 2) on every token,
    each token's gradient its own: d loss_t / d logp_t = -s A_t; a sequence outside the range is
    clipped whole (no gradient on any token whose surrogate takes the clip)."""
    logps = torch.tensor([[-1.0, -2.0, -3.0]], dtype=torch.float64, requires_grad=True)
    old = logps.detach() - t([0.1, 0.3, 5.0])
    mask = t([1, 1, 0])
    s = math.exp(0.2)
    adv = t([2.0, -1.0, 7.0])
    loss, _ = POLICY_LOSSES["gspo"](logps, old, adv, mask, epsilon_low=0.3, epsilon_high=0.3)
    assert torch.allclose(loss * mask, t([-2 * s, s, 0.0]))
    (loss * mask).sum().backward()
    assert torch.allclose(logps.grad, t([-2 * s, s, 0.0]))
    # the paper's tiny range: s = 1.22 > 1 + 4e-4; A > 0 is clipped (no gradient), A < 0 is not
    logps.grad = None
    loss, _ = POLICY_LOSSES["gspo"](logps, old, adv, mask, 3e-4, 4e-4)
    (loss * mask).sum().backward()
    assert torch.allclose(logps.grad, t([0.0, s, 0.0]))


# ------------------------------------------------------------------ the tokenizer check


def _probes(tokenizer):
    from rl.data import render_prompts

    rows = [{"prompt": "Ana has 3 apples and gets 4 more. How many?", "answer": "7"}]
    return render_prompts(rows, tokenizer, "prompt", "answer", "Think.", 512, "probe", "<think>")


def _other_vocabulary(tok):
    tok.add_tokens(["<tool>"])


def _other_ids(tok):
    """The same tokens, two of them swapped: only the ids tell."""
    from tokenizers import Tokenizer

    data = json.loads(tok.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    tok._tokenizer = Tokenizer.from_str(json.dumps(data))


def _other_eos(tok):
    tok.eos_token = "<|endoftext|>"


def _other_template(tok):
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (_other_vocabulary, "vocabulary of {more} tokens, the student's {size}"),
        (_other_ids, "2 tokens have other ids"),
        (_other_eos, "eos_token '<|endoftext|>', the student's '<|im_end|>'"),
        (_other_template, "its chat template renders training prompt 0 as"),
    ],
)
def test_a_teacher_that_tokenizes_otherwise_is_refused(tiny_tokenizer, change, said):
    from rl.distill.on_policy import check_same_tokenizer, tokenizer_difference

    probes = _probes(tiny_tokenizer)
    assert tokenizer_difference(tiny_tokenizer, copy.deepcopy(tiny_tokenizer), probes) is None
    teacher = copy.deepcopy(tiny_tokenizer)
    change(teacher)
    with pytest.raises(ConfigError) as error:
        check_same_tokenizer(tiny_tokenizer, teacher, probes, "runs/teacher")
    message = str(error.value)
    size = len(tiny_tokenizer.get_vocab())
    assert said.format(size=size, more=size + 1) in message and message.startswith(
        "algorithm.teacher: runs/teacher does not"
    )
    assert "\n" not in message


def make_teacher(folder):
    """The tiny model with its weights moved (a teacher that disagrees with the student) and
    the student's tokenizer, saved in ``folder``."""
    from transformers import AutoModelForCausalLM

    from rl.models import load_tokenizer, resolve_model

    tiny = resolve_model("tiny-random")
    model = AutoModelForCausalLM.from_pretrained(tiny)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(folder)
    load_tokenizer(tiny).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("teacher"))


def test_a_mismatched_teacher_stops_the_run_in_one_line(tmp_path, teacher_folder, capsys):
    """End to end: a teacher folder whose chat template differs; `aha train` says so in one
    line before any step."""
    from rl.cli import main
    from rl.models import load_tokenizer

    tokenizer = load_tokenizer(teacher_folder)
    _other_template(tokenizer)
    other = tmp_path / "other-teacher"
    other.mkdir()
    for file in teacher_folder.iterdir():
        (other / file.name).write_bytes(file.read_bytes())
    tokenizer.save_pretrained(other)
    run = tmp_path / "run"
    code = main(
        ["train", TINY, f"run_dir={run}", f"algorithm.teacher={other}", DIGITS, "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "does not tokenize as the student does" in err
    assert not (run / "checkpoints").exists()


# ------------------------------------------------------------------ the config's refusals


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        (["rewards=[]"], "rewards: at least one reward is needed"),
        (["algorithm.teacher=x", "algorithm.teacher_coef=0"], "algorithm.teacher_coef: must be"),
        (["algorithm.teacher=x", "algorithm.dynamic_sampling=true"], "with a teacher those"),
        (["algorithm.teacher=x", "rewards=[]"], "data.eval_size: the held-out evaluation"),
        (["algorithm.teacher=http://h:8000"], "untempered"),
        (["algorithm.teacher=x", "algorithm.teacher_advantage=forward"], "known: reverse_kl"),
    ],
)
def test_what_does_not_go_with_a_teacher_is_refused(overrides, said):
    with pytest.raises(ConfigError, match=said):
        load_config(TINY, ["rollout.temperature=0.7", *overrides])


def test_pure_distillation_and_a_server_at_temperature_one_are_accepted():
    config = load_config(TINY, ["algorithm.teacher=x", "rewards=[]", "data.eval_size=0"])
    assert config.rewards == [] and config.algorithm.teacher_coef == 1.0
    load_config(TINY, ["algorithm.teacher=http://h:8000", "rollout.temperature=1"])


# ------------------------------------------------------------------ runs on the tiny model


def _steps(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "loss" in line]


def _train(tmp_path, *overrides):
    from rl.run import train

    config = load_config(TINY, [f"run_dir={tmp_path / 'run'}", *overrides])
    assert train(config, progress=False).steps == 2
    return tmp_path / "run"


def test_pure_distillation_trains_on_the_teachers_grades_alone(tmp_path, teacher_folder):
    """No rewards: every group advantage is 0, so the only signal is the teacher's; two steps
    change every weight and log distill/reverse_kl (> 0: the teacher disagrees) and the
    teacher's mean log-prob."""
    from rl.models import resolve_model

    run = _train(tmp_path, f"algorithm.teacher={teacher_folder}", "rewards=[]", "data.eval_size=0")
    steps = _steps(run)
    assert [s["step"] for s in steps] == [1, 2]
    for s in steps:
        assert s["reward/mean"] == 0 and s["grad_norm"] > 0
        assert s["distill/reverse_kl"] > 0 and s["distill/teacher_logp"] < 0
        assert s["timing_s/teacher"] > 0
    before = load_file(resolve_model("tiny-random") / "model.safetensors")
    after = load_file(run / "checkpoints" / "step-2" / "model.safetensors")
    assert all(not torch.equal(before[name], after[name]) for name in before)
    # aha eval on it needs a grader named: the run has none
    from rl.evaluate import run_eval

    with pytest.raises(ConfigError, match="rewards: none to grade with"):
        run_eval(str(run), ["arithmetic"], limit=1, progress=False)
    results = run_eval(str(run), ["arithmetic"], limit=1, overrides=[DIGITS], progress=False)
    assert 0 <= results["arithmetic"]["accuracy"] <= 1


def test_distillation_with_a_rule_reward_and_mini_batches(tmp_path, teacher_folder):
    """The teacher's per-token term beside the rewards' group advantages, off-policy (two
    mini-batches: the old log-probs are the behaviour policy's, fixed for the update), GSPO's
    token-level ratio."""
    run = _train(
        tmp_path,
        f"algorithm.teacher={teacher_folder}",
        "algorithm.teacher_coef=0.5",
        DIGITS,
        "train.mini_batch_size=4",
        "algorithm.policy_loss=gspo",
    )
    steps = _steps(run)
    assert all(s["distill/reverse_kl"] > 0 and "reward/mean" in s for s in steps)
    assert all(s["optimizer_steps"] == 2 and math.isfinite(s["loss"]) for s in steps)


def test_the_student_as_its_own_teacher_has_zero_reverse_kl(tmp_path):
    """Teacher = the student's own weights: on the first step (before any update) the two
    log-probs are the same computation, so the KL and the gradient are exactly 0."""
    run = _train(tmp_path, "algorithm.teacher=tiny-random", "rewards=[]", "data.eval_size=0")
    first = _steps(run)[0]
    assert first["distill/reverse_kl"] == 0 and first["grad_norm"] == 0


@pytest.mark.slow
def test_a_lora_run_is_a_teacher(tmp_path, teacher_folder):
    """A LoRA run folder as teacher: its adapter at its newest checkpoint, merged once into a
    plain model that scores."""
    from rl.distill.on_policy import LocalTeacher, build_teacher
    from rl.run import train
    from rl.schemes import DataParallel

    lora_run = tmp_path / "lora"
    config = load_config(
        TINY, [f"run_dir={lora_run}", DIGITS, "model.lora.enabled=true", "train.steps=1"]
    )
    train(config, progress=False)
    student = load_config(TINY, [f"algorithm.teacher={lora_run}", DIGITS])
    from rl.data import load_prompts
    from rl.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("tiny-random"))
    prompts = load_prompts("arithmetic", "train", tokenizer, student.data, [], 0, 2)
    teacher = build_teacher(student, tokenizer, prompts, torch.device("cpu"), DataParallel())
    assert isinstance(teacher, LocalTeacher)
    assert not hasattr(teacher.model, "peft_config")  # merged: a plain transformers model
    assert not any(p.requires_grad for p in teacher.model.parameters())


# ------------------------------------------------------------------ a teacher on a vLLM server


def ScoringServer(model, tokenizer) -> JsonServer:
    """The endpoints a server teacher is asked (/health, /v1/models, /tokenize, and
    /v1/completions with prompt_logprobs), answered by ``model`` at temperature 1 as vLLM does:
    a list per sequence, None first, then {token id: {"logprob": ...}} for each later token."""

    def score(ids: list[int]) -> list:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].double()
        logps = torch.log_softmax(logits, dim=-1)
        return [None] + [
            {str(token): {"logprob": logps[k, token].item(), "rank": 1}}
            for k, token in enumerate(ids[1:])
        ]

    def route(method, path, payload):
        if method == "GET":
            return {"data": [{"id": "teacher"}]} if path == "/v1/models" else None
        if path == "/tokenize":
            if "messages" in payload:
                ids = tokenizer.apply_chat_template(
                    payload["messages"], add_generation_prompt=True, tokenize=True
                )
                ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            else:
                ids = tokenizer.encode(payload["prompt"], add_special_tokens=False)
            return {"tokens": list(ids), "count": len(ids), "max_model_len": 512}
        choices = [
            {"index": i, "text": "", "prompt_logprobs": score(ids), "finish_reason": "length"}
            for i, ids in enumerate(payload["prompt"])
        ]
        return {"choices": choices}

    return JsonServer(route)


def test_a_teacher_on_a_server_scores_as_the_same_model_here(tiny_tokenizer, teacher_folder):
    """The server teacher's [B, T] (prompt log-probs of left-padded rows of different lengths,
    cut at each row's completion) equals the local teacher's at temperature 1; the probe
    prompts went to /tokenize."""
    from types import SimpleNamespace

    from rl.batch import collate
    from rl.data import load_prompts
    from rl.distill.on_policy import LocalTeacher, build_teacher
    from rl.models import load_policy
    from rl.schemes import DataParallel
    from rollouts.record import Rollout

    model = load_policy(teacher_folder, "float32").eval()
    server = ScoringServer(model, tiny_tokenizer)
    try:
        config = load_config(TINY, [f"algorithm.teacher={server.url}", "rollout.temperature=1"])
        prompts = load_prompts("arithmetic", "train", tiny_tokenizer, config.data, [], 0, 3)
        teacher = build_teacher(config, tiny_tokenizer, prompts, torch.device("cpu"), None)
        generator = torch.Generator().manual_seed(0)
        rollouts = [
            Rollout(
                p, torch.randint(3, 300, (n,), generator=generator).tolist(), "", None, "stop", 0
            )
            for p, n in zip(prompts, (5, 2, 7), strict=True)
        ]
        batch = collate(rollouts, tiny_tokenizer.pad_token_id)
        trainer = SimpleNamespace(config=config, model=model, scheme=DataParallel())
        served = teacher.logps(trainer, batch)
    finally:
        server.close()
    local = LocalTeacher(model).logps(trainer, batch)
    assert any("messages" in r for r in server.requests)  # the chat-template probe
    assert torch.equal(batch.completion_mask > 0, served != 0)
    # The same float32 model, with padding here and without on the server: the log-softmax
    # sums ~375 float32 terms (worst case 375 * 2^-24 ~ 2e-5 relative, of logits up to ~10) and
    # masked attention sums in another order (~1e-5 relative per layer, 2 layers): worst case
    # ~5e-4 absolute, typically 1e-6.
    assert torch.allclose(served, local, rtol=0, atol=1e-3)


def test_a_server_with_another_chat_template_is_refused(tiny_tokenizer, teacher_folder):
    from rl.data import load_prompts
    from rl.distill.on_policy import build_teacher
    from rl.models import load_policy

    other = copy.deepcopy(tiny_tokenizer)
    _other_template(other)
    server = ScoringServer(load_policy(teacher_folder, "float32"), other)
    try:
        config = load_config(TINY, [f"algorithm.teacher={server.url}", "rollout.temperature=1"])
        prompts = load_prompts("arithmetic", "train", tiny_tokenizer, config.data, [], 0, 2)
        with pytest.raises(ConfigError, match="its chat template renders training prompt 0"):
            build_teacher(config, tiny_tokenizer, prompts, torch.device("cpu"), None)
    finally:
        server.close()
