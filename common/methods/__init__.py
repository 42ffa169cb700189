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
"""

from .contrastive import ContrastiveLoss
from .dpfpl import factorize, rgp_reconstruct
from .engine import DpSettings, Method, PromptLearner, StepResult
from .local import FullRankLocal, LocalPrompt, LowRankFactors, RefactorizedLocal, SgdSettings


def build_method(
    name: str, rank: int = 8, contrastive_weight: float = 0.5, contrastive_temperature: float = 0.5
) -> Method:
    """The method called ``name`` (the run config's ``method``), assembled from its pieces."""
    builders = {
        "zeroshot": lambda: Method(name, shares_global=False),
        "coop": lambda: Method(name, shares_global=False, local=FullRankLocal()),
        "promptfl": lambda: Method(name, shares_global=True),
        "fedotp": lambda: Method(name, shares_global=True, local=FullRankLocal()),
        "fedpgp": lambda: Method(
            name,
            shares_global=True,
            local=LowRankFactors(rank),
            contrastive=ContrastiveLoss(contrastive_weight, contrastive_temperature),
        ),
        "dpfpl-noresidual": lambda: Method(name, shares_global=True, local=RefactorizedLocal(rank, residual=False)),
        "dpfpl": lambda: Method(name, shares_global=True, local=RefactorizedLocal(rank, residual=True)),
        "secfpp": lambda: Method(name, shares_global=True, local=FullRankLocal()),
    }
    if name not in builders:
        raise ValueError(f"unknown method '{name}'; choose one of {', '.join(builders)}")
    return builders[name]()


__all__ = [
    "ContrastiveLoss",
    "DpSettings",
    "FullRankLocal",
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
