"""What a node clusters on: its *domain gradient*, a label-free direction in prompt space.

v_i = d/dP [ -mean_j logsumexp_c (f_j . t_c(P)) ] at P = P_G,c(i), the node's current domain-level prompt:
how that prompt would move to align the text features of all classes with the node's images as a whole
(the image features f_j and text features t_c are unit vectors; temperature 1, so no single class dominates).

Why not the cross-entropy gradient the node already computes: measured on the embedded default (8 clients,
Dir(0.3) label skew within each of 2 domains), the CE gradients of clients of the same domain are about as far
apart as those of different domains (they are dominated by *which* classes a client holds: the class-level
signal that the local prompt is for), while the domain gradients of one domain are close and the two domains
far apart (docs/secfpp.md). The domain-level prompt should follow the image domain, so that is what is
clustered. It is computed from the node's data and leaves the node only as LCC shares.
"""

from __future__ import annotations

import numpy as np
import torch

from ..prompt import PromptTextEncoder


def domain_gradient(encoder: PromptTextEncoder, prompt: torch.Tensor, features: torch.Tensor) -> np.ndarray:
    """The flattened domain gradient (float64) at ``prompt`` for the node's training ``features``."""
    feats = features.mean(0) if features.dim() == 3 else features  # augmented views: their mean per record
    feats = torch.nn.functional.normalize(feats, dim=-1)
    leaf = prompt.detach().clone().requires_grad_(True)
    energy = -(feats @ encoder(leaf).t()).logsumexp(-1).mean()
    (grad,) = torch.autograd.grad(energy, leaf)
    return grad.detach().cpu().numpy().astype(np.float64).reshape(-1)
