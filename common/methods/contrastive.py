"""FedPGP's prompt-wise contrastive loss (Cui et al., ICML 2024, eq. 12-13).

    L_con = -log( e^{sim(z_G, z_C)/tau} / (e^{sim(z_G, z_C)/tau} + e^{sim(z_G, z_i)/tau}) ), per class, averaged

z_G: text features of the global prompt p_G, z_C: the frozen hand-crafted prompt "a photo of a {c}."
(positive: pulls p_G towards CLIP's general knowledge), z_i: the personalized prompt p_G + U V (negative:
pushes the personalized part to carry what is client-specific). The DP-FPL paper's port dropped it.

The term uses no training record, so the engine adds mu * its gradient to every sample's gradient before
clipping (each sample's loss is CE_j + mu L_con): sensitivity stays C, exactly as for plain DP-SGD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..prompt import PromptTextEncoder


@dataclass(frozen=True)
class ContrastiveLoss:
    weight: float = 0.5  # mu
    temperature: float = 0.5  # tau

    def loss(self, z_global: torch.Tensor, z_personal: torch.Tensor, z_handcrafted: torch.Tensor) -> torch.Tensor:
        pos = (z_global * z_handcrafted).sum(-1) / self.temperature
        neg = (z_global * z_personal).sum(-1) / self.temperature
        logits = torch.stack([pos, neg], dim=-1)
        return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))

    def gradients(
        self, encoder: PromptTextEncoder, p_global: torch.Tensor, prompt: torch.Tensor, z_handcrafted: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu dL_con/dp_G through z_G, mu dL_con/dp through z_i), p being the forward prompt p_G + U V.
        The total derivative w.r.t. p_G is their sum; the local factors see only the second."""
        a = p_global.detach().requires_grad_(True)
        b = prompt.detach().requires_grad_(True)
        value = self.weight * self.loss(encoder(a), encoder(b), z_handcrafted)
        grad_global, grad_prompt = torch.autograd.grad(value, (a, b))
        return grad_global, grad_prompt
