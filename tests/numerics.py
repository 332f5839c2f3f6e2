"""How far apart two float computations of the same quantity may be: the bounds the tests'
tolerances are derived from (docs: Development, "How tolerances are derived").

A float rounding moves a value by at most the unit roundoff u, relative. A sum of n terms
computed in any order (any BLAS, vector width or thread count) is within

    (n - 1) u sum|terms|                 always (Higham, Accuracy and Stability of Numerical
                                         Algorithms, 2nd ed., eq. 4.4), and within
    lambda sqrt(n) u sum|terms|          except with probability below 2 n exp(-lambda^2 / 2)
                                         when the roundings are independent (Higham and Mary,
                                         SIAM J. Sci. Comput. 41(5), 2019)

of the exact sum. With lambda = 10 that probability is below 1e-18 for n up to 10^4: the
tests use the second bound for long chains (a forward pass, where the first compounds into
uselessness) and the first where it is tight enough. A chain of reductions (a layer's outputs
summed by the next) adds its terms: n is the number of terms along the longest chain whose
order differs between the two computations. Both computations err, so a comparison allows twice
the bound, relative to the magnitude of the terms (not of the result: sums that cancel get an
absolute tolerance).
"""

U32 = 2.0**-24  # float32
U64 = 2.0**-53  # float64
LAMBDA = 10.0


def worst_error(n: int, magnitude: float = 1.0, unit: float = U32) -> float:
    return n * unit * magnitude


def probable_error(n: int, magnitude: float = 1.0, unit: float = U32) -> float:
    return LAMBDA * n**0.5 * unit * magnitude


# The tiny random model (rl/models.py: 2 layers, hidden 64, MLP 128, 4 heads of 32, a 512-token
# vocabulary). Terms along one position's forward: per layer the norm (64), q/k/v (64), the
# attention scores (32) and their softmax and weighted sum (up to 40 positions each), the output
# projection (128), the norm (64), gate and up (64), down (128); then the final norm and the
# output layer (64 each).
TINY_ATTENDED = 40
TINY_FORWARD_TERMS = 2 * (64 + 64 + 32 + 2 * TINY_ATTENDED + 128 + 64 + 64 + 128) + 64 + 64
TINY_VOCABULARY = 512
# sum_k |h_k w_k| of a logit: at most 1.35 (measured over positions: the weights' and the norms'
# magnitudes, the same on every machine); at temperature 0.7 the logits are divided by 0.7.
# (The tests' perturbed copy, every weight moved by 0.05 against 0.02: 3.4 at temperature 1.)
TINY_LOGIT_MAGNITUDE = 1.35 / 0.7


def tiny_logp_error(
    forward_terms: int = TINY_FORWARD_TERMS, logit_magnitude: float = TINY_LOGIT_MAGNITUDE
) -> float:
    """One float32 evaluation's error of a token's log-prob, log softmax(z)[t] = z_t - log Z:
    the logits' error twice (z_t, and the weighted mean of all z in log Z) plus the relative error
    of Z, a sum of 512 positive terms."""
    logits = probable_error(forward_terms, logit_magnitude)
    return 2 * logits + probable_error(TINY_VOCABULARY)


# Two float32 computations of the tiny model's log-probs along different kernels (the decode
# loop's cache and packed weights, the trainer's whole-sequence forward, vLLM's own kernels):
# within 2 x tiny_logp_error() = 2.0e-4 of each other. A reduced precision anywhere on either
# side (bf16 or fp16 weights, TF32 matmuls: u >= 2^-11) moves them by 1e-2 and more, a defect
# (stale weights, a wrong position or temperature) by 0.05 and more.
LOGP_TOLERANCE = 5e-4
assert 2 * tiny_logp_error(logit_magnitude=3.4) <= LOGP_TOLERANCE

# Longer chains of the tiny models, for runs whose sampler and trainer are float32 both:
# - the tiny MoE families (rl/moe/tiny.py), per layer up to ~1330 terms: DeepSeek-V3's MLA
#   (q_a 64, q_b 32, kv_a 64, its norm and kv_b 288 each, scores 64, o_proj 128), the router (64),
#   an expert (64, 32), the top-2 and shared-expert combine; OLMoE's hidden 128 gives ~1070;
# - multi-turn trajectories of the dense model, attending up to 200 positions (2 x 200 terms
#   per layer for the softmax and the weighted sum instead of 2 x 40).
# The logits' sum_k |h_k w_k| is at most 2.2 for the MoE families at temperature 1 (OLMoE;
# measured over 160 positions, as for the dense model above); 3.4 allows for trained weights,
# as for the dense model's moved copy. Twice the bound, as every comparison here, and 2x margin
# for the terms left uncounted (norms' reductions, the router's softmax).
TINY_MOE_FORWARD_TERMS = 2 * 1330 + 64 + 64
TINY_MULTITURN_FORWARD_TERMS = TINY_FORWARD_TERMS + 2 * 2 * (200 - TINY_ATTENDED)
LONG_CHAIN_LOGP_TOLERANCE = 1e-3
# (The untrained dense model's trajectory, logits' magnitude 1.4: within LOGP_TOLERANCE.)
assert 2 * tiny_logp_error(TINY_MULTITURN_FORWARD_TERMS, logit_magnitude=1.4) <= LOGP_TOLERANCE
for _terms in (TINY_MOE_FORWARD_TERMS, TINY_MULTITURN_FORWARD_TERMS):
    assert 2 * 2 * tiny_logp_error(_terms, logit_magnitude=3.4) <= LONG_CHAIN_LOGP_TOLERANCE

# bfloat16 keeps 8 significant bits: unit roundoff 2^-8 = 3.9e-3, so large that the bounds above
# say nothing useful (the worst case over the tiny model's ~20 rounding stages is 0.16 of the
# logits' magnitude). The roundings of independent weights and activations have independent
# signs, though: a K-term dot product whose terms each move by up to u (uniformly: standard
# deviation u / sqrt(3)) moves by ~u / sqrt(3 K) of sum|terms|, its rounded result by as much
# again; over 20 stages with K >= 32, the logits move by ~sqrt(20) x 2 u / sqrt(96) = 0.9 u of
# their magnitude (1.35 at temperature 1): sigma ~ 5e-3, a log-prob (two such) ~ 7e-3. A
# bf16 engine against the float32 trainer on the tiny model: within 7 sigma.
BF16_LOGP_SIGMA = 20**0.5 * 2 * 2.0**-8 / 96**0.5 * 1.35 * 2**0.5
BF16_LOGP_TOLERANCE = 0.05
assert 6 * BF16_LOGP_SIGMA < BF16_LOGP_TOLERANCE
