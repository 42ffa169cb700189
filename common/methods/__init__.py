"""Prompt-learning methods on one engine; each differs in small, named pieces.

| method            | prompt                         | shared            | DP                          |
|-------------------|--------------------------------|-------------------|-----------------------------|
| zeroshot          | "a photo of a {c}."            | nothing           | none                        |
| coop              | p_L (local only)               | nothing           | LDP on p_L's gradient       |
| promptfl          | p_G                            | p_G's gradient    | GDP at the server           |
| fedotp            | p_G + p_L (full rank)          | p_G's gradient    | GDP on p_G, LDP on p_L      |
| fedpgp            | p_G + U V (persistent factors) | p_G's gradient    | GDP on p_G, LDP on (U, V)   |
| dpfpl-noresidual  | p_G + U v (refactorized, no r) | p_G's gradient    | GDP on p_G, LDP on (U, v)   |
| dpfpl             | p_G + U v + r                  | p_G's gradient    | GDP on p_G, LDP on (U, v)   |
| secfpp            | p_G,c(i) + p_L (full rank)     | p_G's gradient to its cluster's p_G; LCC shares of a reduced vector | as fedotp |

SecFPP's step is FedOTP's (a domain-level p_G plus a class-level full-rank p_L); what differs is around it: the
server keeps one p_G per cluster and the clusters come from the secret-shared phase in ``dpfpl.common.secfpp``.

Each method's pieces are named once, as data, in ``dpfpl.common.method_specs`` (the run config's ``method``
accepts those names); ``build_method`` builds them.
"""

from collections.abc import Callable

from ..config import RunConfig
from ..method_specs import METHODS, LocalPiece
from .contrastive import ContrastiveLoss
from .dpfpl import factorize, rgp_reconstruct
from .engine import DpSettings, Method, PromptLearner, StepResult
from .local import FullRankLocal, LocalPrompt, LowRankFactors, RefactorizedLocal, SgdSettings

# each local piece that common/method_specs.py names, built for a rank (the full-rank prompt has none)
LOCAL_PIECES: dict[LocalPiece, Callable[[int], LocalPrompt]] = {
    "full-rank": lambda rank: FullRankLocal(),
    "low-rank-factors": LowRankFactors,
    "refactorized": lambda rank: RefactorizedLocal(rank, residual=False),
    "refactorized-residual": lambda rank: RefactorizedLocal(rank, residual=True),
}


def build_method(
    name: str,
    rank: int = RunConfig.field_default("rank"),
    contrastive_weight: float = RunConfig.field_default("contrastive_weight"),
    contrastive_temperature: float = RunConfig.field_default("contrastive_temperature"),
) -> Method:
    """The method called ``name`` (the run config's ``method``), assembled from its pieces
    (common/method_specs.py); the defaults are the run config's."""
    spec = METHODS.get(name)
    if spec is None:
        raise ValueError(f"unknown method '{name}'; choose one of {', '.join(METHODS)}")
    return Method(
        name,
        shares_global=spec.shares_global,
        local=None if spec.local is None else LOCAL_PIECES[spec.local](rank),
        contrastive=ContrastiveLoss(contrastive_weight, contrastive_temperature) if spec.contrastive else None,
    )


__all__ = [
    "ContrastiveLoss",
    "DpSettings",
    "FullRankLocal",
    "LOCAL_PIECES",
    "LocalPrompt",
    "LowRankFactors",
    "Method",
    "PromptLearner",
    "RefactorizedLocal",
    "SgdSettings",
    "StepResult",
    "build_method",
    "factorize",
    "rgp_reconstruct",
]
