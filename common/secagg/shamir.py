"""Shamir's t-of-n secret sharing over the prime field GF(2^521 - 1).

A 32-byte secret (an X25519 private key, a self-mask seed) is one element of this field, so one share is
one field element (66 bytes). Any t shares reconstruct the secret by Lagrange interpolation at 0; fewer
than t are independent of it (information-theoretic). Coefficients come from ``secrets`` (the OS CSPRNG).
"""

from __future__ import annotations

import secrets

SHAMIR_PRIME = (1 << 521) - 1
SHARE_BYTES = 66
SECRET_BYTES = 32


class ShamirError(ValueError):
    pass


def split(secret: bytes, num_shares: int, threshold: int) -> list[tuple[int, bytes]]:
    """Shares (x, y-bytes) for x = 1..num_shares of a polynomial of degree threshold - 1 with f(0) = secret."""
    if len(secret) != SECRET_BYTES:
        raise ShamirError(f"secrets are {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= num_shares:
        raise ShamirError(f"need 1 <= threshold ({threshold}) <= number of shares ({num_shares})")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(SHAMIR_PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, num_shares + 1):
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % SHAMIR_PRIME
        shares.append((x, y.to_bytes(SHARE_BYTES, "big")))
    return shares


def combine(shares: list[tuple[int, bytes]], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares with distinct x (only the first ``threshold`` are used)."""
    points = {}
    for x, y in shares:
        if not 0 < x < SHAMIR_PRIME:
            raise ShamirError(f"share x-coordinate {x} out of range")
        points[x] = int.from_bytes(y, "big") % SHAMIR_PRIME
    if len(points) < threshold:
        raise ShamirError(f"{len(points)} distinct shares, {threshold} needed to reconstruct")
    xs = sorted(points)[:threshold]
    secret = 0
    for i in xs:
        num, den = 1, 1
        for j in xs:
            if j != i:
                num = num * (-j) % SHAMIR_PRIME
                den = den * (i - j) % SHAMIR_PRIME
        secret = (secret + points[i] * num * pow(den, -1, SHAMIR_PRIME)) % SHAMIR_PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ShamirError("the shares do not interpolate to a 32-byte secret (inconsistent shares)")
    return secret.to_bytes(SECRET_BYTES, "big")
