"""SGD with momentum and weight decay as an explicit update (torch.optim.SGD semantics, dampening 0).

Kept explicit because its state (the momentum buffer) is persisted per node and per server: each client
owns its optimizer state (the official code shared momentum across clients, a defect).
"""

from __future__ import annotations

import torch


def sgd_update(
    param: torch.Tensor, grad: torch.Tensor, momentum_buffer: torch.Tensor | None,
    lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (new param, new momentum buffer)."""
    d = grad + weight_decay * param if weight_decay else grad
    if momentum:
        momentum_buffer = d.clone() if momentum_buffer is None else momentum * momentum_buffer + d
        d = momentum_buffer
    return param - lr * d, momentum_buffer
