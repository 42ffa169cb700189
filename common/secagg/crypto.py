"""Key agreement, authenticated encryption and the mask PRG, all from the ``cryptography`` package.

- Key agreement: X25519. Each client has two key pairs per round: ``c`` (encrypts the shares it sends to
  another client through the server) and ``s`` (agrees the pairwise mask seed with every other client).
- Key derivation: HKDF-SHA256 over the X25519 shared secret, with an ``info`` string that binds the purpose,
  the run token, the round and the ordered pair of node ids; so a key is never reused across rounds, runs
  or purposes.
- Authenticated encryption: AES-256-GCM with a random 96-bit nonce; the associated data binds the run, the
  round, sender and receiver, so the server cannot replay a ciphertext into another slot undetected.
- Mask PRG: ChaCha20 keystream (key = a 32-byte seed, zero nonce: each seed is used for one mask only),
  read as 64-bit words, top 3 bits dropped, and the single 61-bit word that is not a field element (p itself)
  rejected, so every mask coordinate is exactly uniform on GF(2^61 - 1). A cryptographic PRG is required
  here: the masks are one-time pads that the server must not predict.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .field import PRIME

KEY_BYTES = 32
NONCE_BYTES = 12


def generate_private_key() -> bytes:
    return X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def public_key(private_key: bytes) -> bytes:
    return (
        X25519PrivateKey.from_private_bytes(private_key)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def agree(private_key: bytes, peer_public_key: bytes, info: bytes) -> bytes:
    """A 32-byte key shared by the two owners of the key pairs, bound to ``info``."""
    if len(peer_public_key) != KEY_BYTES:
        raise ValueError(f"X25519 public keys are {KEY_BYTES} bytes, got {len(peer_public_key)}")
    shared = X25519PrivateKey.from_private_bytes(private_key).exchange(
        X25519PublicKey.from_public_bytes(peer_public_key)
    )
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def pair_info(purpose: str, context: str, a: int, b: int) -> bytes:
    """HKDF info for the (unordered) pair a, b: both ends derive the same key."""
    low, high = sorted((a, b))
    return f"dpfpl-secagg/{purpose}/{context}/{low}/{high}".encode()


def encrypt(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def decrypt(key: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    """Raises ``cryptography.exceptions.InvalidTag`` when the ciphertext or its binding was tampered with."""
    return AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], associated_data)


def mask(seed: bytes, size: int) -> np.ndarray:
    """``size`` uniform elements of GF(2^61 - 1) from a 32-byte seed (deterministic in the seed)."""
    if len(seed) != KEY_BYTES:
        raise ValueError(f"mask seeds are {KEY_BYTES} bytes")
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    out = np.empty(0, dtype=np.uint64)
    while out.size < size:
        need = size - out.size
        words = np.frombuffer(encryptor.update(b"\0" * (8 * (need + 8))), dtype="<u8") >> np.uint64(3)
        out = np.concatenate([out, words[words != np.uint64(PRIME)]])
    return out[:size].copy()
