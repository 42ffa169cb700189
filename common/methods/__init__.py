"""Prompt-learning methods on one engine; each differs in small, named pieces (SPEC section 5)."""

from .dpfpl import DpFplMethod, factorize, rgp_reconstruct

METHODS = {"dpfpl": DpFplMethod, "dpfpl-noresidual": DpFplMethod}

__all__ = ["DpFplMethod", "METHODS", "factorize", "rgp_reconstruct"]
