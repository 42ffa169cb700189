"""A client's update as a field vector with its share of the global noise, and the server's way back.

Distributed noise: **discrete Gaussian on the integers** (Canonne, Kamath, Steinke 2020), each client adding
N_Z(0, sigma_c^2) with sigma_c = z_G * Delta_q / sqrt(t) to its quantized update, where Delta_q is the
quantized sensitivity (``field.quantized_sensitivity``) and t the protocol's threshold. Why this and not the
alternatives:

- continuous Gaussian *before* rounding is not sound: each client's rounding error then depends on its own
  noisy value, so the server's sum is not a post-processing of a Gaussian mechanism;
- noise must be integer to live in the field, and it must be added before masking (after masking only the
  server could add it, which is what this mode does not trust);
- the sum of m discrete Gaussians of variance sigma_c^2 is not exactly a discrete Gaussian, but Kairouz, Liu,
  Steinke (ICML 2021, "distributed discrete Gaussian") bound the gap: the sum satisfies the Renyi DP of a
  discrete Gaussian of variance m sigma_c^2 up to an additive tau = 10 sum_{k=1}^{m-1} exp(-2 pi^2 sigma_c^2
  k / (k + 1)), which ``ddg_tau`` computes; with sigma_c in the thousands of integer units (16 bits) tau
  underflows to 0, and the encoder refuses sigma_c < 4 (tau < 1e-60). The discrete Gaussian has the same
  Renyi/zCDP guarantee as the continuous one of the same variance, so the accountant (continuous-Gaussian
  PLD, as in the central mode) is told the same z_G; the approximation involved is the tau above.

Why sigma_c^2 = (z_G Delta_q)^2 / t and not / N: the round only completes with m >= t survivors, so the sum
carries variance m / t >= 1 times the full global noise whatever the dropouts. The accountant is told z_G (the
guaranteed lower bound); the noise a dropout "loses" is pre-paid by every client adding a little more
(factor N / t in variance with no dropout). ``effective_noise_multiplier`` reports what was really added.
"""

from __future__ import annotations

import math
import secrets

import numpy as np

from .field import HALF, check_fits, quantized_sensitivity, scale_factor, stochastic_round

MIN_CLIENT_SIGMA = 4.0


class EncodingError(ValueError):
    pass


def discrete_gaussian(sigma: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` independent samples of N_Z(0, sigma^2), P(k) proportional to exp(-k^2 / (2 sigma^2)).

    Canonne-Kamath-Steinke rejection sampler (their Algorithm 3): propose a discrete Laplace Y of scale
    t = floor(sigma) + 1 (difference of two geometric variables), accept with probability
    exp(-(|Y| - sigma^2 / t)^2 / (2 sigma^2)). Vectorised; floating point instead of their exact arithmetic,
    which changes the probabilities by rounding errors of order 1e-16."""
    if sigma <= 0:
        return np.zeros(size, dtype=np.int64)
    t = math.floor(sigma) + 1
    success = -math.expm1(-1.0 / t)
    out = np.empty(size, dtype=np.int64)
    todo = np.arange(size)
    while todo.size:
        n = todo.size
        y = rng.geometric(success, n).astype(np.int64) - rng.geometric(success, n).astype(np.int64)
        accept = rng.random(n) < np.exp(-((np.abs(y) - sigma * sigma / t) ** 2) / (2 * sigma * sigma))
        out[todo[accept]] = y[accept]
        todo = todo[~accept]
    return out


def ddg_tau(client_sigma: float, num_summands: int) -> float:
    """Kairouz-Liu-Steinke's additive gap between a sum of discrete Gaussians and one discrete Gaussian."""
    return 10.0 * sum(math.exp(-2 * math.pi**2 * client_sigma**2 * k / (k + 1)) for k in range(1, num_summands))


def client_sigma(noise_multiplier: float, bits: int, dim: int, threshold: int) -> float:
    """sigma_c, the std of each client's discrete Gaussian share (integer units)."""
    return noise_multiplier * quantized_sensitivity(bits, dim) / math.sqrt(threshold)


def effective_noise_multiplier(noise_multiplier: float, survivors: int, threshold: int) -> float:
    """The noise multiplier the unmasked sum really carries: z_G sqrt(m / t) >= z_G."""
    return noise_multiplier * math.sqrt(survivors / threshold)


def encode_update(
    grad: np.ndarray,
    *,
    bits: int,
    clip_norm: float,
    batch_size: int,
    noise_multiplier: float,
    threshold: int,
    num_clients: int,
    noise_share_of: int | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Signed int64 vector R(gamma x) + N_Z(0, sigma_c^2): what the client masks and sends.

    ``grad`` is x = sum_j clip(g_j) / B (any shape; flattened). ``noise_multiplier`` 0 adds no noise (no DP).
    ``noise_share_of``: how many clients' shares make up the global noise (default: the threshold t; 1: this
    client adds all of it). The generator must be unpredictable to the server: by default one seeded from the OS."""
    rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    x = np.asarray(grad, dtype=np.float64).reshape(-1)
    if not np.isfinite(x).all():
        raise EncodingError("the update contains NaN or Inf; nothing is sent")
    gamma = scale_factor(bits, clip_norm, batch_size)
    scaled = gamma * x
    if scaled.size and np.abs(scaled).max() > HALF / max(1, num_clients):  # before the int64 cast could wrap
        raise OverflowError(
            f"a scaled coordinate ({np.abs(scaled).max():.3g}) exceeds the per-client field range; "
            "lower secagg-quantization-bits"
        )
    values = stochastic_round(scaled, rng)
    if noise_multiplier > 0:
        sigma = client_sigma(noise_multiplier, bits, x.size, noise_share_of or threshold)
        if sigma < MIN_CLIENT_SIGMA:
            raise EncodingError(
                f"each client's noise share has std {sigma:.3g} integer units (< {MIN_CLIENT_SIGMA}); "
                "the discrete-Gaussian sum would not be close to one Gaussian: raise "
                "secagg-quantization-bits"
            )
        values = values + discrete_gaussian(sigma, x.size, rng)
    check_fits(values, num_clients)
    return values


def decode_sum(total: np.ndarray, *, bits: int, clip_norm: float, batch_size: int, num_summands: int) -> np.ndarray:
    """The unmasked integer sum of m = ``num_summands`` encodings -> the noisy mean of the m updates (float64)."""
    if num_summands < 1:
        raise EncodingError("nothing to decode: no summands")
    return np.asarray(total, dtype=np.float64) / (scale_factor(bits, clip_norm, batch_size) * num_summands)
