"""Fixed-point embedding of a reduced, unit-norm prompt into the prime field, and the no-wrap-around check.

x -> round(2^q x) as a signed integer, embedded centered (v mod p; an element above (p - 1) / 2 reads back as
negative). Deterministic rounding, not stochastic: the clustering only needs the same integers on every side
(the plaintext k-means that the secure one must equal runs on exactly these integers); no DP claim rests on it.

Why the range check matters: coded values are only correct modulo p. A coded squared distance
n_s^2 ||x_i - c_s||^2 in integer units that exceeded (p - 1) / 2 would decode to a wrong (even negative) number
without any error. The inputs are unit vectors, so |coordinate| <= 2^q, every coordinate of n_s x_i - S_s is
at most 2 n_s 2^q <= 2 N 2^q in absolute value, and the decoded total over d' coordinates is at most
d' (2 N 2^q)^2. ``check_range`` refuses a configuration where that bound reaches (p - 1) / 2 (before any work).
"""

from __future__ import annotations

import numpy as np

from .lcc import LccParameterError


def max_scaled_distance(dim: int, num_clients: int, bits: int) -> int:
    """The largest n_s^2 ||x_i - c_s||^2 (integer units) that unit-norm inputs can produce."""
    return dim * (2 * num_clients * (1 << bits)) ** 2


def check_range(dim: int, num_clients: int, bits: int, prime: int) -> None:
    """Refuse (never wrap) a field too small for the quantized distances."""
    if bits < 1:
        raise LccParameterError(f"secfpp-quantization-bits must be >= 1, got {bits}")
    bound = max_scaled_distance(dim, num_clients, bits)
    if bound > (prime - 1) // 2:
        raise LccParameterError(
            f"quantized distances reach {bound} (d'={dim}, N={num_clients}, q={bits} bits), beyond the field's "
            f"centered range (p - 1) / 2 = {(prime - 1) // 2}: they would wrap around; lower the bits or the "
            "reduced dimension, or use a larger prime"
        )


def quantize(x: np.ndarray, bits: int) -> np.ndarray:
    """Signed integers round(2^q x) (int64) of a vector with |x_i| <= 1."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.isfinite(x).all() or (x.size and np.abs(x).max() > 1.0 + 1e-9):
        raise ValueError("quantize expects a finite vector with coordinates in [-1, 1] (a unit vector)")
    return np.rint(x * (1 << bits)).astype(np.int64)


def to_field(values: np.ndarray, prime: int) -> np.ndarray:
    """Signed ints -> field elements (Python ints in an object array), centered embedding."""
    return np.array([int(v) % prime for v in np.asarray(values).reshape(-1)], dtype=object)


def from_field(value: int, prime: int) -> int:
    """A field element -> the signed integer it stands for (centered)."""
    value = int(value) % prime
    return value - prime if value > (prime - 1) // 2 else value
