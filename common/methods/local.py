"""What a node keeps to itself: the local part of each method's prompt.

Every method's forward prompt is ``p_G + local context`` (or one of the two). The loss depends on the local
parameters only through that context, so their gradients are linear maps of the context gradient g
(per sample or summed): a full-rank local prompt takes g itself, factors U, V take (g V^T, U^T g). That
is why one engine serves every method: it computes g once and each ``LocalPrompt`` says how its
parameters read it, how they are updated, and what context they produce.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from ..optim import sgd_update
from ..prompt import CONTEXT_INIT_STD, random_context
from .dpfpl import factorize, rgp_reconstruct

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SgdSettings:
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0


def sgd_step(params: Tensors, grads: Tensors, momentum: Tensors, opt: SgdSettings) -> tuple[Tensors, Tensors]:
    """One SGD step on every named tensor, each with its own momentum buffer."""
    new_params, new_momentum = dict(params), dict(momentum)
    for name, grad in grads.items():
        new_params[name], buf = sgd_update(
            params[name], grad, momentum.get(name), opt.lr, opt.momentum, opt.weight_decay
        )
        if buf is not None:
            new_momentum[name] = buf
    return {k: v.detach() for k, v in new_params.items()}, {k: v.detach() for k, v in new_momentum.items()}


def _check_rank(rank: int, n_ctx: int, width: int) -> None:
    """Fail when the run is configured, not at the first step, for a rank the context cannot have."""
    if rank > min(n_ctx, width):
        raise ValueError(f"rank {rank} exceeds min(n-ctx, width) = {min(n_ctx, width)}")


class LocalPrompt(ABC):
    """The local part of a personalized prompt: its persistent tensors, the context it adds to the forward
    prompt, how its parameters' gradients follow from the context gradient, and how it is updated."""

    @abstractmethod
    def init(self, n_ctx: int, width: int, generator: torch.Generator, std: float = CONTEXT_INIT_STD) -> Tensors:
        """Fresh persistent tensors (the node's private state). ``std``: the random init's scale of a full-rank
        local prompt (a prompt initialized from text starts its local part near zero, so that the
        personalized prompt starts as the hand-written one)."""

    @abstractmethod
    def noised_size(self, n_ctx: int, width: int) -> int:
        """How many coordinates one local DP release noises (the trainable local parameters)."""

    def prepare(self, state: Tensors, generator: torch.Generator) -> Any:
        """Per-step auxiliaries (e.g. this step's factorization); ``None`` when there are none."""
        return None

    @abstractmethod
    def context(self, state: Tensors, aux: Any) -> torch.Tensor:
        """The (n_ctx, width) context this step's forward prompt adds."""

    @abstractmethod
    def param_grads(self, g: torch.Tensor, aux: Any, state: Tensors) -> list[torch.Tensor]:
        """Gradients of the trainable local parameters from the context gradient g (batched or not)."""

    @abstractmethod
    def apply(
        self, state: Tensors, grads: list[torch.Tensor], aux: Any, momentum: Tensors, opt: SgdSettings
    ) -> tuple[Tensors, Tensors]:
        """Step the local state with the (already clipped, noised and averaged) parameter gradients."""

    def eval_context(self, state: Tensors) -> torch.Tensor:
        """The context of the personalized prompt at evaluation and export time."""
        return self.context(state, self.prepare(state, torch.Generator().manual_seed(0)))


class FullRankLocal(LocalPrompt):
    """A full-rank local prompt p_L trained directly on its gradient (CoOp; FedOTP's local prompt).

    FedOTP's optimal-transport matching of prompts to image patches is not part of this engine: like the
    DP-FPL paper's port, ``fedotp`` is p_G + p_L on the CLS image feature, LDP on p_L's gradient.
    """

    def init(self, n_ctx: int, width: int, generator: torch.Generator, std: float = CONTEXT_INIT_STD) -> Tensors:
        return {"p_local": random_context(n_ctx, width, generator, std)}

    def noised_size(self, n_ctx: int, width: int) -> int:
        return n_ctx * width

    def context(self, state: Tensors, aux: Any) -> torch.Tensor:
        return state["p_local"]

    def param_grads(self, g: torch.Tensor, aux: Any, state: Tensors) -> list[torch.Tensor]:
        return [g]

    def apply(self, state, grads, aux, momentum, opt):
        return sgd_step(state, {"p_local": grads[0]}, momentum, opt)


class LowRankFactors(LocalPrompt):
    """Persistent learnable factors U (n_ctx x k), V (k x d), context U V (FedPGP). Both start at
    N(0, 0.02^2) as in FedPGP's code (not LoRA's zero init)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def init(self, n_ctx: int, width: int, generator: torch.Generator, std: float = CONTEXT_INIT_STD) -> Tensors:
        # both factors keep FedPGP's N(0, 0.02^2) whatever ``std``: their product is already small, and
        # smaller factors would starve each other's gradients (dU = g V^T, dV = U^T g)
        _check_rank(self.rank, n_ctx, width)
        return {"u": random_context(n_ctx, self.rank, generator), "v": random_context(self.rank, width, generator)}

    def noised_size(self, n_ctx: int, width: int) -> int:
        return self.rank * (n_ctx + width)

    def context(self, state: Tensors, aux: Any) -> torch.Tensor:
        return state["u"] @ state["v"]

    def param_grads(self, g: torch.Tensor, aux: Any, state: Tensors) -> list[torch.Tensor]:
        return [g @ state["v"].t(), state["u"].t() @ g]

    def apply(self, state, grads, aux, momentum, opt):
        return sgd_step(state, {"u": grads[0], "v": grads[1]}, momentum, opt)


class RefactorizedLocal(LocalPrompt):
    """DP-FPL's local prompt: full-rank p_L, re-factorized every step (U, v, residual r), trained through its
    factors' gradients and rebuilt to full rank with RGP (paper eq. 4). ``residual=False`` is the
    ``dpfpl-noresidual`` ablation: the forward prompt drops r."""

    def __init__(self, rank: int, residual: bool = True) -> None:
        self.rank = rank
        self.residual = residual

    def init(self, n_ctx: int, width: int, generator: torch.Generator, std: float = CONTEXT_INIT_STD) -> Tensors:
        _check_rank(self.rank, n_ctx, width)
        return {"p_local": random_context(n_ctx, width, generator, std)}

    def noised_size(self, n_ctx: int, width: int) -> int:
        return self.rank * (n_ctx + width)  # the factor gradients (gU, gv) carry the noise

    def prepare(self, state: Tensors, generator: torch.Generator):
        return factorize(state["p_local"], self.rank, generator)

    def context(self, state: Tensors, aux) -> torch.Tensor:
        u, v, r = aux
        return u @ v + r if self.residual else u @ v

    def param_grads(self, g: torch.Tensor, aux, state: Tensors) -> list[torch.Tensor]:
        u, v, _ = aux
        return [g @ v.t(), u.t() @ g]

    def apply(self, state, grads, aux, momentum, opt):
        u, v, _ = aux
        return sgd_step(state, {"p_local": rgp_reconstruct(grads[0], grads[1], u, v)}, momentum, opt)

    def eval_context(self, state: Tensors) -> torch.Tensor:
        if self.residual:
            return state["p_local"]  # U v + r = p_L exactly, whatever the factorization's random start
        return super().eval_context(state)
