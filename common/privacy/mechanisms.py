"""Per-sample gradients, per-sample clipping, Gaussian noise and Poisson sampling (pure functions).

Per-sample gradients: in prompt learning every sample's loss depends on the learnable context only through
the C class text features, so one forward pass of the text tower serves the whole batch and the B
per-sample gradients are B vector-Jacobian products of that one graph. ``torch.autograd.grad`` with
``is_grads_batched=True`` runs them as one vectorized backward (vmap over the cotangents), faster than an
explicit per-sample copy of the context through one big batch (the measurement is in docs/performance.md,
``dpfpl/bench/per_sample_grads.py``). Attention
runs on the math SDPA kernel, which has vmap batching rules (the CPU flash-attention backward has none and
silently falls back to a per-sample loop). The batch is processed in chunks so memory stays bounded.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Callable

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def per_sample_grads(
    per_sample_losses: Callable[[torch.Tensor], torch.Tensor],
    param: torch.Tensor,
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of each sample's loss w.r.t. ``param``: returns ((B, *param.shape), the B losses).

    ``per_sample_losses(param)`` must return the vector of B per-sample losses. Samples are processed in
    chunks of ``chunk_size`` cotangents to bound the memory of the vectorized backward.
    """
    param = param.detach().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):
        losses = per_sample_losses(param)
        batch = losses.shape[0]
        if batch == 0:
            return param.new_zeros((0, *param.shape)), losses.detach()
        eye = torch.eye(batch, dtype=losses.dtype, device=losses.device)
        chunks = []
        starts = list(range(0, batch, max(1, chunk_size)))
        for i, start in enumerate(starts):
            (g,) = torch.autograd.grad(
                losses,
                param,
                grad_outputs=eye[start : start + chunk_size],
                is_grads_batched=True,
                retain_graph=i < len(starts) - 1,
            )
            chunks.append(g)
    return torch.cat(chunks), losses.detach()


def _scale_to_norm(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    return (max_norm / (norms + 1e-6)).clamp(max=1.0)


def clip_per_sample(grads: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale each sample's gradient (first dim) to L2 norm <= max_norm."""
    norms = grads.flatten(1).norm(dim=1)
    return grads * _scale_to_norm(norms, max_norm).view(-1, *([1] * (grads.dim() - 1)))


def clip_per_sample_jointly(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """Clip several per-sample tensors by their *joint* per-sample norm (e.g. the factors (gU, gv))."""
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(dim=1) for g in grads))
    scale = _scale_to_norm(norms, max_norm)
    return [g * scale.view(-1, *([1] * (g.dim() - 1))) for g in grads]


def dp_generator(dp: bool, seed: int) -> torch.Generator:
    """The generator of a party's noise and Poisson samples.

    Under DP it is seeded from the OS, never from the (public) run config: noise an adversary can predict
    protects nothing, and amplification by subsampling needs a secret sample. Without DP there is nothing to
    hide, and following ``seed`` makes runs reproducible."""
    return torch.Generator().manual_seed(secrets.randbits(63) if dp else seed)


SECURE_DRAWS = 4  # Holohan & Braghin (2021): the sum of 4 draws / 2, as Opacus' secure_mode


def csprng_standard_normal(size: int) -> np.ndarray:
    """``size`` independent N(0, 1) draws in float64, every bit of randomness from the OS CSPRNG (``os.urandom``;
    no seeded stream at all, so nothing spans two releases and there is no state to recover). Box-Muller on two
    uniforms of 53 random bits each, centred in their grid cells so that log(0) cannot occur."""
    pairs = (size + 1) // 2
    words = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs) >> np.uint64(11)
    u1 = (words[0].astype(np.float64) + 0.5) / 2.0**53
    u2 = (words[1].astype(np.float64) + 0.5) / 2.0**53
    radius = np.sqrt(-2.0 * np.log(u1))
    return np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])[:size]


def standard_normal(
    shape: torch.Size | tuple[int, ...], generator: torch.Generator | None, dtype: torch.dtype, secure: bool = False
) -> torch.Tensor:
    """N(0, 1) noise of ``shape`` on the CPU.

    Default: torch's Mersenne Twister (``generator``, OS-seeded under DP) and its floating-point Gaussian.
    ``secure``: why and what -- floating-point Gaussian samplers leak through the gaps of their output
    grid (Mironov 2012; Jin et al. 2022), and a Mersenne Twister's state can be recovered from enough of its
    outputs. Each release then draws every bit from the OS CSPRNG (``csprng_standard_normal``, float64), and
    returns the sum of four draws divided by two (still exactly N(0, 1)), summed in float64 and only then cast;
    summing independent samples fills the gaps a single floating-point sample leaves (Holohan & Braghin 2021,
    the defence Opacus' ``secure_mode`` uses). The caller's generator is not advanced.
    """
    if not secure:
        return torch.randn(shape, generator=generator, dtype=dtype, device="cpu")
    size = math.prod(shape)
    total = sum(csprng_standard_normal(size) for _ in range(SECURE_DRAWS)) / math.sqrt(SECURE_DRAWS)
    return torch.from_numpy(np.asarray(total, dtype=np.float64).reshape(tuple(shape))).to(dtype)


def add_gaussian_noise(
    tensor: torch.Tensor, std: float, generator: torch.Generator | None = None, secure: bool = False
) -> torch.Tensor:
    """tensor + N(0, std^2) per coordinate (std = noise_multiplier * sensitivity / divisor); ``secure``: see
    ``standard_normal``."""
    if std == 0.0:
        return tensor
    noise = standard_normal(tensor.shape, generator, tensor.dtype, secure)
    return tensor + std * noise.to(tensor.device)


def poisson_sample(num_examples: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson subsample: every record is included independently with prob ``sample_rate``.

    This is what makes the accountant's amplification-by-subsampling valid; the batch size varies.
    """
    mask = torch.rand(num_examples, generator=generator) < sample_rate
    return mask.nonzero().flatten()
