"""The prompt-learning methods, named once: each name with the small pieces its method is made of, as data.

The run config's ``method`` accepts exactly these names, and ``dpfpl.common.methods.build_method`` assembles
each method from its pieces. The table is plain data in a module of its own, free of imports, because the run
config is read by torch-free processes (a forwarding ClientApp, the resident worker before it listens) and the
pieces themselves (``dpfpl.common.methods.local``) are torch code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# the node's private part of the prompt (``dpfpl.common.methods.local``): full rank, FedPGP's persistent
# factors U V, or DP-FPL's refactorized U v (with or without the residual r)
LocalPiece = Literal["full-rank", "low-rank-factors", "refactorized", "refactorized-residual"]
RANKED_PIECES: tuple[LocalPiece, ...] = ("low-rank-factors", "refactorized", "refactorized-residual")


@dataclass(frozen=True)
class MethodSpec:
    """What one method is made of."""

    shares_global: bool  # whether the node sends p_G's gradient (and the server keeps a global prompt)
    local: LocalPiece | None = None  # None: no local prompt
    contrastive: bool = False  # FedPGP's prompt-wise contrastive loss

    @property
    def ranked(self) -> bool:
        """Whether the local prompt has a rank (the run config's ``rank``)."""
        return self.local in RANKED_PIECES


METHODS: dict[str, MethodSpec] = {
    "zeroshot": MethodSpec(shares_global=False),
    "coop": MethodSpec(shares_global=False, local="full-rank"),
    "promptfl": MethodSpec(shares_global=True),
    "fedotp": MethodSpec(shares_global=True, local="full-rank"),
    "fedpgp": MethodSpec(shares_global=True, local="low-rank-factors", contrastive=True),
    "dpfpl-noresidual": MethodSpec(shares_global=True, local="refactorized"),
    "dpfpl": MethodSpec(shares_global=True, local="refactorized-residual"),
    # SecFPP's step is FedOTP's; its clusters live around it (server_app/secfpp_round.py)
    "secfpp": MethodSpec(shares_global=True, local="full-rank"),
}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
# the methods whose local prompt has a rank
RANKED_METHODS: tuple[str, ...] = tuple(name for name, spec in METHODS.items() if spec.ranked)
