"""The epsilon lower bound of "Privacy auditing with one (1) training run" (Steinke, Nasr, Jagielski, NeurIPS
2023), for (epsilon, delta)-DP, and the ceiling a perfect observer of a Gaussian release could reach.

Why written here (scipy only) and not taken from a library: the implementations that exist (jax-privacy's
auditing module, Privacy Meter) come with JAX or TensorFlow/PyTorch training stacks; the computation itself is
two short functions of binomial tails, checked in the tests against the paper's published numbers.

The game: m canaries, each included with probability 1/2 by a secret coin. The auditor guesses "in" for the
k_+ highest scores and "out" for the k_- lowest, abstaining on the rest: r = k_+ + k_- guesses, v of them
correct. Under (epsilon, delta)-DP (the paper's Theorem 5.2 with its delta term, Algorithm 2 of the appendix)

    P[V >= v] <= P[Binomial(r, e^eps / (1 + e^eps)) >= v] + 2 m delta * max_i P[v > Binomial >= v - i] / i

and the reported lower bound is the largest epsilon whose bound is still below 1 - confidence: had the run been
(epsilon, delta)-DP for any larger epsilon, a count of correct guesses this high would have had probability
below 1 - confidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[at least v of r guesses correct] for an (epsilon, delta)-DP mechanism with m canaries."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # the accuracy of epsilon-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta <= 0 or v == 0:
        return min(beta, 1.0)
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v-1], P[B = v-2], ..., P[B = 0]
    alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))  # max_i P[v > B >= v - i] / i
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon for which v correct out of r guesses (m canaries) is still unlikely enough: with
    probability >= ``confidence`` the mechanism is not (epsilon', delta)-DP for any epsilon' below it.
    0 when the guesses are no evidence at all."""
    if not 0 < confidence < 1:
        raise ValueError("confidence must lie in (0, 1)")
    p = 1.0 - confidence
    if r == 0 or p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    low, high = 0.0, 1.0  # p_value(low) < p <= p_value(high)
    while p_value(m, r, v, high, delta) < p:
        low, high = high, high * 2
        if high > 1e3:
            return math.inf
    for _ in range(40):
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) < p:
            low = mid
        else:
            high = mid
    return low


@dataclass(frozen=True)
class Guesses:
    """The auditor's best abstention: k_+ "in" guesses from the top, k_- "out" guesses from the bottom."""

    epsilon: float
    guesses: int
    correct: int
    k_in: int
    k_out: int


def guess_counts(scores: np.ndarray, included: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every k: correct "in" guesses among the k highest and correct "out" guesses among the k lowest."""
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    inc = np.asarray(included, dtype=bool)[order]
    top = np.concatenate([[0], np.cumsum(inc)])  # top[k]: included among the k highest
    bottom = np.concatenate([[0], np.cumsum(~inc[::-1])])  # bottom[k]: excluded among the k lowest
    return top, bottom


def candidate_ks(m: int) -> list[int]:
    """The guess counts searched: a geometric grid of about 20 values from 2 to m. The paper reports the best k
    after the fact; here the search is paid for by a union bound (each k is tested at (1 - confidence) / |grid|),
    so the stated confidence holds for the audit as a whole, at the price of a slightly lower bound."""
    ks = sorted({int(round(x)) for x in np.geomspace(2, m, 20)} | {m})
    return [k for k in ks if 1 <= k <= m]


def best_guesses(
    scores: np.ndarray, included: np.ndarray, delta: float, confidence: float = 0.95, symmetric: bool = True
) -> Guesses:
    """The largest lower bound over the abstention levels: k_+ = k_- = k/2 (``symmetric``) or k_+ = k, k_- = 0,
    each tested at the union bound's share of 1 - confidence (``candidate_ks``)."""
    m = len(scores)
    top, bottom = guess_counts(scores, included)
    best = Guesses(0.0, 0, 0, 0, 0)
    ks = candidate_ks(m)
    per_k = 1.0 - (1.0 - confidence) / len(ks)
    for k in ks:
        k_in, k_out = ((k + 1) // 2, k // 2) if symmetric else (k, 0)
        if k_in + k_out > m:
            continue
        v = int(top[k_in] + bottom[k_out])
        eps = epsilon_lower_bound(m, k_in + k_out, v, delta, per_k)
        if eps > best.epsilon:
            best = Guesses(eps, k_in + k_out, v, k_in, k_out)
    return best


def gaussian_mu(epsilon: float, delta: float) -> float:
    """mu of the Gaussian mechanism N(mu, 1) vs N(0, 1) that is exactly (epsilon, delta)-DP (Balle and Wang's
    analytic condition: delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2))."""

    def delta_of(mu: float) -> float:
        return stats.norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * stats.norm.cdf(-epsilon / mu - mu / 2)

    low, high = 1e-6, 1.0
    while delta_of(high) < delta:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_of(mid) < delta else (low, mid)
    return (low + high) / 2


def ceiling(epsilon: float, m: int, delta: float = 1e-5, confidence: float = 0.95) -> float:
    """The most this audit can report for an exactly (epsilon, delta)-DP Gaussian release observed perfectly:
    m canaries, half included, each canary's score N(mu, 1) when in and N(0, 1) when out; the auditor guesses
    the k/2 highest scores "in" and the k/2 lowest "out", v is the expected number of correct guesses
    (rounded), and the best k of a geometric grid is taken. Computed, not looked up: it matches the published
    idealized numbers to within 0.05 at m = 10000 and at m = 1000 for epsilon = 8; at m = 1000 and small epsilon
    it is lower than the published ones (0.23 against 0.30 at epsilon = 1), see docs/audit.md."""
    mu = gaussian_mu(epsilon, delta)

    def tail(t: float) -> float:  # the share of all scores above t
        return 0.5 * stats.norm.sf(t - mu) + 0.5 * stats.norm.sf(t)

    best = 0.0
    for k in sorted({int(round(x)) for x in np.geomspace(2, m, 80)}):
        lo, hi = -20.0, 20.0 + mu  # the threshold with k/2 of m scores above it, on average
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if tail(mid) > k / (2 * m) else (lo, mid)
        t = (lo + hi) / 2
        precision = 0.5 * stats.norm.sf(t - mu) / tail(t)  # = the "out" guesses' precision, by symmetry
        best = max(best, epsilon_lower_bound(m, k, min(round(k * precision), k), delta, confidence))
    return best
