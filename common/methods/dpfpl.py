"""DP-FPL (Tran et al., ICLR 2025): global prompt + full-rank local prompt trained on its low-rank factors.

One local step on a Poisson minibatch (SPEC section 3):
 1. factorize p_L at rank k with one power-iteration step: U (n_ctx x k), v (k x d), residual r;
 2. forward with p = p_G + U v + r (numerically p_G + p_L; ``dpfpl-noresidual`` drops r);
 3. per-sample gradients g_j = dloss_j/dp; factor gradients gU_j = g_j v^T, gv_j = U^T g_j (matmuls);
 4. clip g_j to C_G; clip (gU_j, gv_j) jointly to C_L;
 5. local DP: sum the clipped factor gradients, add N(0, (z_L C_L)^2), divide by the expected batch B;
 6. rebuild the full-rank gradient with RGP (paper eq. 4, minus sign) and step p_L;
 7. the only tensor that leaves: sum_j clip(g_j) / B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..optim import sgd_update
from ..privacy import add_gaussian_noise, clip_per_sample, clip_per_sample_jointly, per_sample_grads, poisson_sample
from ..prompt import PromptTextEncoder


def factorize(p_local: torch.Tensor, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def noisy_factor_gradient_sums(g: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dp: "DpSettings",
                               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Local DP on the factors: per-sample (gU_j, gv_j) = (g_j v^T, U^T g_j), clipped jointly to C_L, summed,
    plus N(0, (z_L C_L)^2) per coordinate (the caller divides by the expected batch size)."""
    g_u, g_v = clip_per_sample_jointly([g @ v.t(), u.t() @ g], dp.max_grad_norm_local)
    noise_std = dp.noise_multiplier_local * dp.max_grad_norm_local
    return (add_gaussian_noise(g_u.sum(0), noise_std, generator),
            add_gaussian_noise(g_v.sum(0), noise_std, generator))


@dataclass
class StepResult:
    global_grad: torch.Tensor  # sum_j clip(g_j) / B: the only tensor that leaves the node
    p_local: torch.Tensor
    momentum: torch.Tensor | None
    loss: float
    batch_size: int


@dataclass(frozen=True)
class DpSettings:
    enabled: bool
    noise_multiplier_local: float
    max_grad_norm_local: float
    max_grad_norm_global: float


class DpFplMethod:
    """The DP-FPL client step. ``use_residual=False`` is the ``dpfpl-noresidual`` ablation."""

    shares = ("global-grad",)

    def __init__(self, encoder: PromptTextEncoder, logit_scale: float, rank: int, use_residual: bool = True,
                 chunk_size: int = 32) -> None:
        self.encoder = encoder
        self.logit_scale = logit_scale
        self.rank = rank
        self.use_residual = use_residual
        self.chunk_size = chunk_size

    def personalized_prompt(self, p_global: torch.Tensor, p_local: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.use_residual:
            return p_global + p_local  # = p_G + U v + r exactly
        u, v, _ = factorize(p_local, self.rank, generator)
        return p_global + u @ v

    def _losses(self, features: torch.Tensor, labels: torch.Tensor):
        def fn(prompt: torch.Tensor) -> torch.Tensor:
            logits = self.logit_scale * features @ self.encoder(prompt).t()
            return F.cross_entropy(logits, labels, reduction="none")
        return fn

    def train_step(
        self, p_global: torch.Tensor, p_local: torch.Tensor, momentum: torch.Tensor | None,
        features: torch.Tensor, labels: torch.Tensor, expected_batch: int, dp: DpSettings,
        lr_local: float, momentum_coef: float, weight_decay: float, generator: torch.Generator,
    ) -> StepResult:
        idx = poisson_sample(len(features), min(1.0, expected_batch / len(features)), generator).to(features.device)
        feats, labs = features[idx], labels[idx]
        u, v, r = factorize(p_local, self.rank, generator)
        prompt = p_global + u @ v + (r if self.use_residual else 0.0)
        loss_fn = self._losses(feats, labs)
        if dp.enabled:
            g, losses = per_sample_grads(loss_fn, prompt, self.chunk_size)  # (b, n_ctx, d), (b,)
            g_global = clip_per_sample(g, dp.max_grad_norm_global).sum(0)
            g_u, g_v = noisy_factor_gradient_sums(g, u, v, dp, generator)
            loss = float(losses.mean()) if len(idx) else float("nan")
        else:
            prompt = prompt.detach().requires_grad_(True)
            losses = loss_fn(prompt)
            (g_sum,) = torch.autograd.grad(losses.sum(), prompt) if len(idx) else (torch.zeros_like(prompt),)
            g_global, g_u, g_v = g_sum, g_sum @ v.t(), u.t() @ g_sum
            loss = float(losses.mean().detach()) if len(idx) else float("nan")
        # Divide by the *expected* batch size: with Poisson sampling the actual size is data-dependent and
        # dividing by it would break the sensitivity bound.
        g_global, g_u, g_v = g_global / expected_batch, g_u / expected_batch, g_v / expected_batch
        grad_local = rgp_reconstruct(g_u, g_v, u, v)
        new_local, new_momentum = sgd_update(p_local, grad_local, momentum, lr_local, momentum_coef, weight_decay)
        return StepResult(g_global.detach(), new_local.detach(), new_momentum, loss, len(idx))
