"""The run's class list, identified by a digest that the server sends with every instruction.

Why: a label is an index into the class list, and every node predicts over all of it. A node whose list
differs from the server's (another dpfpl version with other demo classes, a silo configured for another
class order, an organization that pinned a list the run does not use) would train its labels against the
wrong class names and send gradients for the wrong task, silently. Comparing a SHA-256 of the ordered list
before any work catches that; the class names themselves need not travel.
"""

from __future__ import annotations

import hashlib

DIGEST_KEY = "classes-sha256"


class ClassListMismatch(ValueError):
    """The node's class list is not the server's: it refuses to train or evaluate."""


def class_list_digest(classnames: list[str] | tuple[str, ...]) -> str:
    """SHA-256 of the ordered class list (order matters: labels are indices into it)."""
    return hashlib.sha256("\n".join(classnames).encode()).hexdigest()


def parse_classnames(text: str) -> list[str]:
    """A comma-separated class list, as in the run config's ``classnames``."""
    return [c.strip() for c in text.split(",") if c.strip()]


def check_class_list(server_digest: str | None, classnames: list[str], source: str) -> None:
    """Raise ``ClassListMismatch`` naming both digests when this node's list is not the server's."""
    if server_digest is None:
        raise ClassListMismatch(
            f"the server sent no '{DIGEST_KEY}' with this instruction, so this node cannot check that it trains "
            "on the same class list; the server runs an older or foreign ServerApp: update it"
        )
    own = class_list_digest(classnames)
    if own != server_digest:
        raise ClassListMismatch(
            f"class list mismatch: the server's class list has SHA-256 {server_digest[:16]}..., this node's "
            f"({source}, {len(classnames)} classes) has {own[:16]}...; labels would be matched to the wrong "
            "class names. Give the server and every node the same ordered list (run config 'classnames', "
            "node config 'classnames') and the same dpfpl version"
        )
