"""Chunked log-probs (output layer + log-softmax per chunk of tokens, recomputed in backward)
equal the plain path: values, entropy and gradients, with padding, with LoRA."""

import pytest
import torch
from numerics import LOGP_TOLERANCE, TINY_FORWARD_TERMS, TINY_VOCABULARY, probable_error

from rl.batch import collate, completion_logps, forward_tokens, logps_in_chunks
from rl.config import LoraConfig
from rl.models import load_policy, load_tokenizer, resolve_model
from rollouts.record import Prompt, Rollout


def rollouts(lengths, group_size=1):
    """Prompts and completions of different lengths (left and right padding both happen);
    ``group_size`` completions per prompt, of lengths c, c-1, ..."""
    torch.manual_seed(1)
    out = []
    for i, (p, c) in enumerate(lengths):
        prompt = Prompt(index=i, messages="q", ids=torch.randint(5, 200, (p,)).tolist(), row={})
        for j in range(group_size):
            ids = torch.randint(5, 200, (max(c - j, 1),)).tolist()
            out.append(Rollout(prompt, ids, "", None, "stop", 0, advantage=float(i + j) - 1.5))
    return out


@pytest.fixture(scope="module")
def batch():
    pad = load_tokenizer(resolve_model("tiny-random")).pad_token_id
    return collate(rollouts([(3, 9), (6, 2), (4, 5)]), pad)


@pytest.fixture(scope="module")
def grouped_batch():
    pad = load_tokenizer(resolve_model("tiny-random")).pad_token_id
    return collate(rollouts([(3, 9), (6, 2), (4, 5)], group_size=3), pad)


def test_forward_tokens_count_each_shared_prompt_once(grouped_batch):
    # prompts of 3, 6 and 4 tokens, 3 completions each: 9+8+7, 2+1+1 and 5+4+3 tokens
    completions, prompts_per_row, prompts_once = 24 + 4 + 12, 3 * (3 + 6 + 4), 3 + 6 + 4
    model = torch.nn.Linear(1, 1)
    assert forward_tokens(model, grouped_batch) == completions + prompts_per_row
    assert forward_tokens(model, grouped_batch, share_prompts=True) == completions + prompts_once
    model.gradient_checkpointing = True  # no shared cache under checkpointing: every row's prompt
    assert forward_tokens(model, grouped_batch, share_prompts=True) == completions + prompts_per_row
    # a micro-batch trimmed to its own widths: rows 0 and 1 share the 3-token prompt
    assert forward_tokens(torch.nn.Linear(1, 1), grouped_batch.select([0, 1]), True) == 9 + 8 + 3


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("chunk_tokens", [1, 4, 1000])
def test_chunked_logps_equal_the_plain_ones_with_gradients(batch, lora, chunk_tokens):
    check_against_plain(batch, lora, chunk_tokens, share_prompts=False)


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("chunk_tokens", [0, 4])
def test_shared_prompt_forward_equals_the_plain_one_with_gradients(
    grouped_batch, lora, chunk_tokens
):
    check_against_plain(grouped_batch, lora, chunk_tokens, share_prompts=True)
    # and on a micro-batch whose groups are cut and mixed
    check_against_plain(grouped_batch.select([7, 0, 1, 4]), lora, chunk_tokens, share_prompts=True)


# A gradient coordinate sums each token's contribution through the backward of the forward's
# chain: about 2 x TINY_FORWARD_TERMS + the vocabulary + ~50 tokens terms, whose absolute values
# add up to at most 3x the tensor's largest gradient (measured per token on these batches: the
# model's and the data's magnitudes). Both paths err (tests/numerics.py): 2 x 3 x 3.4e-5 = 2e-4
# of the largest gradient. A chunk's or a shared prompt's gradient lost or counted twice moves
# a gradient by a tenth of it and more.
GRADIENT_TERMS = 2 * TINY_FORWARD_TERMS + TINY_VOCABULARY + 50
GRADIENT_TOLERANCE = 5e-4  # of the tensor's largest gradient
assert 2 * 3 * probable_error(GRADIENT_TERMS) < GRADIENT_TOLERANCE


def check_against_plain(batch, lora, chunk_tokens, share_prompts, device="cpu"):
    model = load_policy(resolve_model("tiny-random"), "float32", LoraConfig(enabled=lora, r=4))
    model.to(device)
    if lora:  # peft starts B at 0: move it, so the adapters take part in the forward
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    mask, advantages = batch.completion_mask.to(device), batch.advantages.to(device)

    def run(tokens, share=False):
        model.zero_grad(set_to_none=True)
        logps, entropy = completion_logps(model, batch, 0.7, True, tokens, share)
        (logps * mask * advantages[:, None]).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return logps.detach() * mask, entropy * mask, grads

    plain, plain_entropy, plain_grads = run(0)
    chunked, chunked_entropy, chunked_grads = run(chunk_tokens, share_prompts)
    # The output layer and the softmax in other shapes, and with shared prompts the whole
    # forward: log-probs within LOGP_TOLERANCE; the entropy, log Z - sum p z, likewise.
    torch.testing.assert_close(chunked, plain, atol=LOGP_TOLERANCE, rtol=0)
    torch.testing.assert_close(chunked_entropy, plain_entropy, atol=LOGP_TOLERANCE, rtol=0)
    assert plain_grads.keys() == chunked_grads.keys()
    for name, grad in plain_grads.items():
        atol = GRADIENT_TOLERANCE * float(grad.abs().max())
        torch.testing.assert_close(chunked_grads[name], grad, atol=atol, rtol=0, msg=name)
    # the output layer is back in place after the forward
    assert not isinstance(model.get_output_embeddings(), torch.nn.Identity)


def test_logps_in_chunks_without_grad(batch):
    model = load_policy(resolve_model("tiny-random"), "float32")
    plain = logps_in_chunks(model, batch, 2, 1.0, 0) * batch.completion_mask
    chunked = logps_in_chunks(model, batch, 2, 1.0, 3) * batch.completion_mask
    torch.testing.assert_close(chunked, plain, atol=LOGP_TOLERANCE, rtol=0)


@pytest.mark.parametrize("module", ["rl.benchmarks.memory", "rl.benchmarks.vs_trl"])
def test_benchmark_help(module):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "usage" in done.stdout


def test_memory_benchmark_measures_each_variant_in_its_own_process(capsys):
    from rl.benchmarks import memory

    memory.main(["--model", "wide-tiny", "--batch", "1", "--prompt", "4", "--completion", "16"])
    out = capsys.readouterr().out
    assert all(variant in out for variant in memory.VARIANTS) and "failed" not in out


def test_token_log_probs_and_entropy_against_log_softmax_with_gradients():
    from rl.batch import TokenLogProbs

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 40, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 40, (3, 5))
    assert torch.autograd.gradcheck(lambda x: TokenLogProbs.apply(x, targets)[0], (logits,))
    logps, entropy = TokenLogProbs.apply(logits, targets)
    log_softmax = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(logps, log_softmax.gather(-1, targets[..., None]).squeeze(-1))
    torch.testing.assert_close(entropy, -(log_softmax.exp() * log_softmax).sum(dim=-1))
    assert not entropy.requires_grad  # logged, never trained on
    # In float32 over a real vocabulary, close to the float64 value. ATen sums a float32 row in
    # cascade (4 levels of 16 for 49k terms, then the vector lanes): within ~70 x 2^-24 = 4.2e-6
    # of sum|terms| on any CPU. log Z: 4.2e-6; sum p z: 4.2e-6 x max|z| (~18 for 4 x randn over
    # 49k) = 7.5e-5; 8e-5 in all. A batched dot product (MKL's) was off by 1e-3 here: what this
    # test is for.
    wide = torch.randn(64, 49_152) * 4
    reference = torch.log_softmax(wide.double(), dim=-1)
    _, wide_entropy = TokenLogProbs.apply(wide.requires_grad_(), torch.zeros(64, dtype=torch.long))
    expected = -(reference.exp() * reference).sum(dim=-1).float()
    torch.testing.assert_close(wide_entropy, expected, rtol=0, atol=1e-4)
