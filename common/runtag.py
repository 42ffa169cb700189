"""A number that names the run a reply belongs to, echoed by the nodes in every reply's metrics.

Why: the run token (``ServerState.run_token``) is a string and metric records carry numbers only. A reply
computed for another run (a node that kept a cached reply of an earlier run with the same round number, a
node configured against another SuperLink's run directory) passes every shape and norm check; its tag does
not match, so the server rejects it. The tag is a digest, not a secret: the token is not derivable from it
and nothing private is in the token.
"""

from __future__ import annotations

import hashlib

RUN_TAG_KEY = "run-tag"


def run_tag(run_token: str) -> int:
    """A 52-bit integer (exact in a float64 metric) derived from the run token."""
    return int(hashlib.sha256(run_token.encode()).hexdigest()[:13], 16)
