"""Gradient-space canaries: the records an audit plants in one node's training data.

Why they are valid canaries for this run's guarantee. The accountant's neighbouring relation is add/remove one
record (``common/privacy/accountant.py``); the mechanism it charges is: every record of the node enters a step
with probability q (Poisson), its per-sample gradient is clipped to C (C_G for the global reply, C_L jointly for
the local factors), the clipped gradients are summed, and Gaussian noise is added. Canary i behaves exactly as
one more record of the node: when its secret coin says "in", it enters each step with the node's declared
probability q (its own generator, independent of the data's sample), and its per-sample prompt gradient,
``NORM_FACTOR`` x C_G along a fixed random unit direction u_i, goes through the same clip, sum and noise as the
batch's records (``PromptLearner.train_step``'s ``canaries`` argument). Whatever a record's gradient is, the
run's (epsilon, delta) guarantee covers adding or removing it, so it covers each canary; with all m canaries
present the guarantee holds for each one given the others, which is what the one-run audit needs.

The canary's gradient is set above the clip norm on purpose: on correct code the clip brings it to C_G (the
most one record can move a release), and where clipping is broken the canary moves the release by more and the
audit sees it.
"""

from __future__ import annotations

from typing import Any

import torch

from ..common.privacy import clip_per_sample_jointly

NORM_FACTOR = 10.0  # the canaries' pre-clip gradient norm, in units of C_G


def canary_directions(m: int, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """m unit directions in the prompt's space: orthonormal where the space has room (m <= its dimension), so
    that one canary's contribution to a release adds nothing to another's score; random unit vectors otherwise
    (their overlaps, about 1/sqrt(dimension) each, then add up to a noise that loosens the audit)."""
    dim = 1
    for size in shape:
        dim *= size
    directions = torch.randn(dim, m, generator=gen, dtype=torch.float64)
    if m <= dim:
        directions, _ = torch.linalg.qr(directions)  # orthonormal columns: a uniformly random m-frame
    else:
        directions = directions / directions.norm(dim=0, keepdim=True)
    return directions.t().to(torch.float32).reshape(m, *shape)


class GradientCanaries:
    """m canaries in the prompt's gradient space, included by a seeded secret coin, Poisson-sampled per step."""

    def __init__(
        self,
        m: int,
        shape: tuple[int, ...],
        sample_rate: float,
        max_grad_norm_global: float,
        max_grad_norm_local: float,
        local=None,
        seed: int = 0,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.directions = canary_directions(m, shape, gen)
        self.included = torch.rand(m, generator=gen) < 0.5  # the secret coins
        self.sample_rate = sample_rate
        self.norm = NORM_FACTOR * max_grad_norm_global
        self.max_grad_norm_local = max_grad_norm_local
        self.local = local  # the method's LocalPrompt (None: no local release)
        self._poisson = torch.Generator().manual_seed(seed + 1)
        self.sampled = torch.zeros(m, dtype=torch.bool)  # this step's canaries in the batch
        self.local_directions: list[torch.Tensor] = []  # each canary's clipped local contribution this step

    @property
    def m(self) -> int:
        return len(self.included)

    def records(self, g: torch.Tensor, aux: Any, local: dict) -> torch.Tensor:
        """The canary records of this step's Poisson sample (their per-sample prompt gradients)."""
        coins = torch.rand(self.m, generator=self._poisson) < self.sample_rate
        self.sampled = coins & self.included
        gradients = self.norm * self.directions.to(g.device, g.dtype)
        if self.local is not None:  # the white-box adversary knows the step's factorization: where each canary goes
            per_canary = self.local.param_grads(gradients, aux, local)
            self.local_directions = [t.detach() for t in clip_per_sample_jointly(per_canary, self.max_grad_norm_local)]
        return gradients[self.sampled.to(g.device)]
