"""The field the masked sums live in, and the quantization of a clipped gradient into it.

Field: integers modulo the Mersenne prime p = 2^61 - 1. Every element fits a uint64 and the sum of two
elements (< 2^62) never overflows, so vector addition is one numpy add and one reduction. Signed integers
are embedded centered: v -> v mod p, and an element e > (p - 1) / 2 reads back as e - p. The unmasked sum
is exact as long as |sum| <= (p - 1) / 2 ~ 1.15e18 (``check_fits`` enforces a per-client share of that range).

Quantization (why and how the clipping bound absorbs it): a client's clipped, averaged global gradient
x = sum_j clip(g_j) / B moves by at most C / B in L2 when one record is added or removed. It is scaled by
gamma = 2^bits * B / C, so that bound becomes exactly 2^bits integer units, and rounded stochastically
(unbiased: R_w(a) = floor(a + w) with w ~ U[0, 1)^d drawn once per round, so P(round up) = frac(a)). For one
draw w the rounded vectors of two neighbouring inputs a, a' differ per coordinate by less than |a_i - a'_i| + 1,
so in L2 by less than ``quantized_sensitivity = 2^bits + sqrt(d)``; the mechanism R_w(a) + noise is a mixture
over w (the same w-distribution for both neighbours) of Gaussian-type mechanisms of that sensitivity, and a
mixture is at least as private as its worst component (joint convexity of the hockey-stick divergence). The
integer noise is calibrated to that bound, so the noise multiplier the accountant is told stays exact: the
quantization costs noise (a factor 1 + sqrt(d) / 2^bits, 0.1% at d = 4096, bits = 16), never privacy. The
rounding error itself is below 1 / gamma = C / (2^bits B) per coordinate of one client's vector, zero-mean,
far below the DP noise (std z C / B on the sum).

Range: a coordinate of gamma x is at most 2^bits * (Poisson batch / B) in absolute value (|x_i| <= ||x|| <=
C * batch / B), the noise share a few standard deviations; ``check_fits`` refuses (never wraps) a value beyond
(p - 1) / (2 N), which 16 bits leave ~10^12-fold unused.
"""

from __future__ import annotations

import math

import numpy as np

PRIME = (1 << 61) - 1
HALF = (PRIME - 1) // 2


def field_add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a + b) mod p for uint64 vectors of field elements."""
    s = a + b
    return np.where(s >= PRIME, s - np.uint64(PRIME), s).astype(np.uint64)


def field_neg(a: np.ndarray) -> np.ndarray:
    return np.where(a == 0, a, np.uint64(PRIME) - a).astype(np.uint64)


def field_sub(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return field_add(a, field_neg(b))


def to_field(values: np.ndarray) -> np.ndarray:
    """Signed int64 values with |v| <= (p - 1) / 2 -> field elements (centered embedding)."""
    values = np.asarray(values, dtype=np.int64)
    if values.size and int(np.abs(values).max()) > HALF:
        raise OverflowError("a value does not fit the field's centered range (|v| <= (p - 1) / 2)")
    return np.where(values < 0, values + np.int64(PRIME), values).astype(np.uint64)


def from_field(elements: np.ndarray) -> np.ndarray:
    """Field elements -> signed int64 (the inverse of ``to_field``)."""
    elements = np.asarray(elements, dtype=np.uint64)
    signed = elements.astype(np.int64)
    return np.where(elements > np.uint64(HALF), signed - np.int64(PRIME), signed)


def is_field_vector(values: np.ndarray) -> bool:
    """What the server can check about a masked reply: uint64 field elements (< p)."""
    return values.dtype == np.uint64 and (values.size == 0 or int(values.max()) < PRIME)


def scale_factor(bits: int, clip_norm: float, batch_size: int) -> float:
    """gamma: one record's contribution to x = sum clip(g_j) / B (L2 <= C / B) becomes 2^bits integer units."""
    return (2.0**bits) * batch_size / clip_norm


def quantized_sensitivity(bits: int, dim: int) -> float:
    """L2 bound between the stochastically rounded, scaled vectors of two neighbouring inputs under one
    rounding draw: 2^bits from the record, < 1 per coordinate from the rounding (see the module docstring)."""
    return 2.0**bits + math.sqrt(dim)


def stochastic_round(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unbiased rounding to integers, floor(a + w) with w ~ U[0, 1): E[round(a)] = a."""
    values = np.asarray(values, dtype=np.float64)
    return np.floor(values + rng.random(values.shape)).astype(np.int64)


def check_fits(values: np.ndarray, num_clients: int) -> None:
    """Each of ``num_clients`` summands must stay within 1/num_clients of the centered range, so the sum
    cannot wrap around p (a wrapped sum would be silently wrong)."""
    limit = HALF // max(1, num_clients)
    if values.size and int(np.abs(values).max()) > limit:
        raise OverflowError(
            f"a quantized coordinate ({int(np.abs(values).max())}) exceeds the per-client field range {limit}; "
            "lower secagg-quantization-bits"
        )
