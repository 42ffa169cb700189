"""How a run ended, in words a user can act on: which nodes were unfit at setup (and why), and in how many
rounds the global prompt really moved.

Why a file: the ServerApp runs in its own process (often on another machine than the command that launched
it), and Flower reports a failed ServerApp only as a status. The ServerApp writes ``outcome.json`` into the
run directory before it ends, successfully or not, and logs the same paragraph; ``dpfpl simulate``/``demo``
read the file to print the paragraph and choose their exit status, ``dpfpl report`` reads ``summary.json``.
The schema is a pydantic model because it crosses that process boundary.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .atomic import write_bytes

OUTCOME_FILE = "outcome.json"


class RunFailed(RuntimeError):
    """A run that cannot produce a result (too few healthy nodes, no round updated the global prompt). Its
    message is the paragraph the user reads; it ends the ServerApp so that Flower marks the run failed."""


class NodeFailure(BaseModel):
    """A node the setup phase could not use: how the server names it and the reason it reported (or that it
    did not reply)."""

    model_config = ConfigDict(frozen=True)

    node: str
    reason: str


class RunOutcome(BaseModel):
    """What the ServerApp tells the command that launched it."""

    model_config = ConfigDict(frozen=True)

    status: Literal["completed", "setup-failed", "no-round-updated"]
    min_clients: int = Field(ge=1)
    healthy_nodes: int = Field(ge=0)
    failed_nodes: list[NodeFailure] = Field(default_factory=list)
    rounds_run: int = Field(0, ge=0)  # training rounds that ran (resumed ones included)
    rounds_updated: int = Field(0, ge=0)  # ... of which updated the global prompt (enough valid replies)

    @property
    def failed_rounds(self) -> int:
        return self.rounds_run - self.rounds_updated

    def paragraph(self) -> str:
        """One paragraph: what happened, what it means, what to do."""
        if self.status == "setup-failed":
            by_reason: dict[str, list[str]] = {}  # one line per reason (a mis-sized simulation fails every node)
            for failure in self.failed_nodes:
                by_reason.setdefault(failure.reason, []).append(failure.node)
            named = "; ".join(f"{', '.join(nodes)}: {reason}" for reason, nodes in by_reason.items()) or "none reported"
            return (
                f"the run stopped before round 1: {self.healthy_nodes} node(s) passed the setup check (model "
                f"loaded, data checked), fewer than min-clients = {self.min_clients}. Failed nodes: {named}. "
                "Fix these nodes (each node's own log has the details) or lower min-clients."
            )
        updated = f"the global prompt was updated in {self.rounds_updated} of {self.rounds_run} rounds"
        if self.status == "no-round-updated":
            return (
                f"{updated}: no round had min-clients = {self.min_clients} valid replies, so the "
                '"final" prompt is its initialization and the run has no result. The server\'s log names the '
                "rejected or missing replies of each round."
            )
        if self.failed_rounds:
            return (
                f"warning: {updated}; {self.failed_rounds} round(s) had fewer than min-clients = "
                f"{self.min_clients} valid replies and changed nothing (the server's log names the rejected or "
                "missing replies)."
            )
        return updated

    def write(self, run_dir: Path) -> None:
        write_bytes(Path(run_dir) / OUTCOME_FILE, self.model_dump_json(indent=2).encode())

    @classmethod
    def read(cls, run_dir: Path) -> RunOutcome | None:
        path = Path(run_dir) / OUTCOME_FILE
        if not path.is_file():
            return None
        return cls.model_validate_json(path.read_text())


# Flower reports a ClientApp's exception as "<class 'X'>:<'message'>". The simulation engine re-raises it as
# "Exception ClientAppException occurred. Message: message" inside a Ray error whose text carries the traceback,
# and wraps that once more. The node's own message is what follows the last marker, less the wrappers.
_SIMULATION_MARKER = re.compile(r"Exception \w+ occurred\. Message:\s*")
_CLASS_PREFIX = re.compile(r"<class '[^']+'>:<'")
_CLASS_SUFFIX = re.compile(r"(?:'>\s*)+$")


def client_error_text(reason: str) -> str:
    """The message a node's exception carried, without Flower's (and Ray's) wrapping, on one line."""
    text = _SIMULATION_MARKER.split(reason)[-1]
    text = _CLASS_SUFFIX.sub("", _CLASS_PREFIX.sub("", text).strip())
    return " ".join(text.split()) or "no reason given"
