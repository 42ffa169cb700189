"""Lagrange coded computing (Yu et al., AISTATS 2019) over a prime field: shares, thresholds, decoding.

Why LCC and not Shamir: one degree-(K+T-1) polynomial carries K secret slices at once (a share is 1/K the
size of the vector), and the shares of different users can be added (coded sums) and multiplied (coded
squared distances) by every holder locally; the holders never talk to each other.

Encoding (``Lcc.encode``): the K data slices X_1..X_K and T uniform random slices Z_1..Z_T sit at the
interpolation points beta_1..beta_{K+T}; u(z) = sum_k W_k l_k(z) is the unique polynomial of degree <= K+T-1
through them, and holder j gets u(alpha_j). The alphas are disjoint from the betas, which is what makes any
T shares a one-time pad of the data (the T x T matrix [l_{K+t}(alpha_j)] is invertible): T-privacy.

Decoding (``Lcc.decode``): a holder applies a polynomial f of total degree ``degree`` to its shares; f(u(z))
has degree (K+T-1) * degree, so any (K+T-1) * degree + 1 results determine it, and evaluating it at the betas
gives f(X_k). Linear functions (sums) need K+T results, squared distances 2(K+T-1)+1; with fewer the
interpolation is of the wrong polynomial and the value is garbage (``decode`` refuses).

Arithmetic: elements are Python ints in numpy object arrays, so any prime works (the default is the
project's Mersenne prime 2^61 - 1 from ``dpfpl.common.secagg.field``) and a product never overflows; the vectors
here are small (a reduced prompt of a few dozen coordinates), so the speed of object arithmetic is no issue.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..secagg.crypto import mask
from ..secagg.field import PRIME


class LccParameterError(ValueError):
    """A configuration that the LCC thresholds or the field cannot support; raised before any work."""


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24 (the bases below suffice), so a typo'd prime is refused."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for q in small:
        if n % q == 0:
            return n == q
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def required_results(num_slices: int, privacy: int, degree: int) -> int:
    """How many holders' results decode f of total degree ``degree``: (K+T-1) deg + 1."""
    return (num_slices + privacy - 1) * degree + 1


def uniform_field(size: int, prime: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """``size`` uniform field elements as Python ints. Without ``rng``: from the OS's CSPRNG (ChaCha20 masks
    for the default prime, ``secrets`` otherwise), since the padding is a one-time pad. ``rng`` only in tests."""
    if rng is not None:
        values = rng.integers(0, prime, size=size, dtype=np.int64) if prime < 2**63 else None
        if values is None:
            return (
                np.array([int(rng.integers(0, 2**62)) * 2 + int(rng.integers(0, 2)) for _ in range(size)], dtype=object)
                % prime
            )
        return values.astype(object)
    if prime == PRIME:
        return mask(os.urandom(32), size).astype(object)
    return np.array([secrets.randbelow(prime) for _ in range(size)], dtype=object)


def _lagrange_matrix(nodes: list[int], targets: list[int], prime: int) -> np.ndarray:
    """M[t, i] = l_i(targets[t]) for the Lagrange basis on ``nodes``: values at the nodes -> values at targets."""
    out = np.empty((len(targets), len(nodes)), dtype=object)
    for t, x in enumerate(targets):
        for i, xi in enumerate(nodes):
            num, den = 1, 1
            for m, xm in enumerate(nodes):
                if m != i:
                    num = num * (x - xm) % prime
                    den = den * (xi - xm) % prime
            out[t, i] = num * pow(den, -1, prime) % prime
    return out


def interpolate(nodes: list[int], values: np.ndarray, targets: list[int], prime: int) -> np.ndarray:
    """Evaluate at ``targets`` the polynomial of degree < len(nodes) through (nodes, values) (values: one row
    per node, any trailing shape). With too few nodes this is *a* polynomial, not the right one."""
    if len(set(n % prime for n in nodes)) != len(nodes):
        raise LccParameterError("interpolation nodes must be distinct field elements")
    values = np.asarray(values, dtype=object)
    flat = values.reshape(len(nodes), -1)
    out = _lagrange_matrix(list(nodes), list(targets), prime).dot(flat) % prime
    return out.reshape((len(targets),) + values.shape[1:])


@dataclass(frozen=True)
class Lcc:
    """One LCC code: N holders, K data slices, privacy T, the prime p, and the largest polynomial degree the
    computation on shares will have (1: sums, 2: squared distances). Validated on construction."""

    num_holders: int
    num_slices: int = 1
    privacy: int = 1
    degree: int = 2
    prime: int = PRIME

    def __post_init__(self) -> None:
        n, k, t, deg, p = self.num_holders, self.num_slices, self.privacy, self.degree, self.prime
        if k < 1:
            raise LccParameterError(f"secfpp-lcc-slices K must be >= 1, got {k}")
        if t < 1:
            raise LccParameterError(f"secfpp-privacy T must be >= 1 (T = 0 would send the data in clear), got {t}")
        if deg < 1:
            raise LccParameterError(f"the computation's degree must be >= 1, got {deg}")
        need = required_results(k, t, deg)
        if n < need:
            raise LccParameterError(
                f"{n} holders cannot decode a degree-{deg} function of shares with K={k} slices and privacy T={t}: "
                f"that needs (K+T-1)*{deg}+1 = {need} results; lower K or T, or add clients"
            )
        if not is_prime(p):
            raise LccParameterError(f"the field modulus {p} is not prime")
        if p < n + k + t:
            raise LccParameterError(f"the field ({p}) needs at least N+K+T = {n + k + t} distinct points")

    @property
    def betas(self) -> list[int]:
        """Interpolation points of the K data slices and the T random slices: 1..K+T."""
        return list(range(1, self.num_slices + self.privacy + 1))

    @property
    def alphas(self) -> list[int]:
        """Evaluation points of the N holders: K+T+1..K+T+N, disjoint from the betas (needed for privacy)."""
        start = self.num_slices + self.privacy + 1
        return list(range(start, start + self.num_holders))

    @cached_property
    def _encoder(self) -> np.ndarray:
        return _lagrange_matrix(self.betas, self.alphas, self.prime)  # (N, K+T)

    def needed(self, degree: int | None = None) -> int:
        return required_results(self.num_slices, self.privacy, self.degree if degree is None else degree)

    def slice_length(self, dim: int) -> int:
        return -(-dim // self.num_slices)

    def split(self, vector: np.ndarray) -> np.ndarray:
        """A field vector of length d -> K slices of ceil(d / K), zero-padded (zeros change no sum or distance)."""
        vector = np.asarray(vector, dtype=object).reshape(-1)
        m = self.slice_length(vector.size)
        padded = np.concatenate([vector, np.zeros(m * self.num_slices - vector.size, dtype=object)])
        return padded.reshape(self.num_slices, m)

    def encode(self, vector: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """The N shares (N, ceil(d / K)) of a field vector: share j = u(alpha_j)."""
        data = self.split(vector) % self.prime
        pad = uniform_field(self.privacy * data.shape[1], self.prime, rng).reshape(self.privacy, data.shape[1])
        return self._encoder.dot(np.concatenate([data, pad])) % self.prime

    def decode(self, holders: list[int], results: np.ndarray, degree: int | None = None) -> np.ndarray:
        """f(X_1..X_K) (shape (K, ...)) from the results f(share_j) of the holders at indices ``holders``;
        refuses fewer than (K+T-1) deg + 1 results (they would interpolate the wrong polynomial)."""
        need = self.needed(degree)
        if len(set(holders)) != len(holders) or not all(0 <= h < self.num_holders for h in holders):
            raise LccParameterError(f"holder indices must be distinct, in [0, {self.num_holders}): {holders}")
        if len(holders) < need:
            raise LccParameterError(
                f"{len(holders)} results cannot decode a degree-{degree or self.degree} "
                f"function with K={self.num_slices}, T={self.privacy}: {need} are needed"
            )
        use = list(holders)[:need]
        values = np.asarray(results, dtype=object)[:need]
        return interpolate([self.alphas[h] for h in use], values, self.betas[: self.num_slices], self.prime)
