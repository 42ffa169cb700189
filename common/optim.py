"""SGD with momentum and weight decay as an explicit update (torch.optim.SGD semantics, dampening 0).

Kept explicit because its state (the momentum buffer) is persisted per node and per server: each client
owns its optimizer state (the official code shared momentum across clients, a defect).
"""

from __future__ import annotations

import torch


def sgd_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (new param, new momentum buffer)."""
    d = grad + weight_decay * param if weight_decay else grad
    if momentum:
        momentum_buffer = d.clone() if momentum_buffer is None else momentum * momentum_buffer + d
        d = momentum_buffer
    return param - lr * d, momentum_buffer


def noise_bounded_lr(
    *,
    lr: float,
    radius: float,
    reference_norm: float,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch: int,
    steps: int,
    noised_size: int,
) -> float:
    """The largest step size <= ``lr`` whose accumulated DP noise stays within ``radius`` x ``reference_norm``.

    Why: a node's noisy step adds N(0, (lr z C / B)^2) to each of its ``noised_size`` coordinates; over
    ``steps`` steps the noise is a random walk of expected norm lr z C sqrt(steps * noised_size) / B. A node
    with a small data set has a large sample rate, so a large z, and at a fixed lr its noise outgrows the
    prompt it is added to (its prompt then collapses). Bounding the walk's norm keeps every node within a
    radius of its initialization. Only public quantities enter (z follows from epsilon, the declared q and the
    planned steps), so choosing the step this way costs no privacy. Keyword-only: eight numbers by position
    invite a swap that no type checker catches.
    """
    if radius <= 0 or noise_multiplier <= 0 or noise_multiplier == float("inf") or noised_size <= 0:
        return lr
    walk = noise_multiplier * max_grad_norm * (steps * noised_size) ** 0.5 / expected_batch
    return min(lr, radius * reference_norm / walk)


def fold_into_mean(mean: torch.Tensor | None, count: int, value: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The running mean of ``count`` iterates with one more folded in (a detached CPU copy: the published
    prompt's p_G on the server, and a node's p_L context, are both kept this way)."""
    value = value.detach().cpu().clone()
    if count == 0 or mean is None:
        return value, 1
    return (mean * count + value) / (count + 1), count + 1
