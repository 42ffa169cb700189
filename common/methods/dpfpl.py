"""DP-FPL's own math (Tran et al., ICLR 2025): the one-step power-iteration factorization and RGP.

The step itself is the shared engine (``engine.py``) with ``local.RefactorizedLocal``:

One local step on a Poisson minibatch:
 1. factorize p_L at rank k with one power-iteration step: U (n_ctx x k), v (k x d), residual r;
 2. forward with p = p_G + U v + r (numerically p_G + p_L; ``dpfpl-noresidual`` drops r);
 3. per-sample gradients g_j = dloss_j/dp; factor gradients gU_j = g_j v^T, gv_j = U^T g_j (matmuls);
 4. clip g_j to C_G; clip (gU_j, gv_j) jointly to C_L;
 5. local DP: sum the clipped factor gradients, add N(0, (z_L C_L)^2), divide by the expected batch B;
 6. rebuild the full-rank gradient with RGP (paper eq. 4, minus sign) and step p_L;
 7. the only tensor that leaves: sum_j clip(g_j) / B.
"""

from __future__ import annotations

import torch


def factorize(
    p_local: torch.Tensor, rank: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-step power iteration: U = orth(p_L V0), v = orth(p_L^T U)^T, r = p_L - U v."""
    n_ctx, d = p_local.shape
    if rank > min(n_ctx, d):
        raise ValueError(f"rank {rank} exceeds min(n_ctx, width) = {min(n_ctx, d)}")
    v0 = torch.randn(d, rank, generator=generator, dtype=p_local.dtype).to(p_local.device)
    u, _ = torch.linalg.qr(p_local @ v0)  # (n_ctx, k), orthonormal columns
    q, _ = torch.linalg.qr(p_local.t() @ u)  # (d, k), orthonormal columns
    v = q.t()  # (k, d), orthonormal rows
    return u, v, p_local - u @ v


def rgp_reconstruct(grad_u: torch.Tensor, grad_v: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full-rank local gradient from the factor gradients (paper eq. 4, with the paper's minus sign)."""
    return grad_u @ v + u @ grad_v - u @ (u.t() @ grad_u) @ v
