"""Secure aggregation with distributed noise: the server learns only the noised sum.

field.py (GF(2^61 - 1), quantization), shamir.py (t-of-n sharing), crypto.py (X25519, HKDF, AES-GCM, ChaCha20
from ``cryptography``), protocol.py (client/server state machines), encoding.py (quantization + discrete
Gaussian noise shares), simulate.py (one round in memory, for tests and the benchmark).
"""
