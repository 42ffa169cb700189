"""The refusals a node's handlers raise whose text names no private detail of the node: the server may read them
(a separated worker sends them as they are, ``client_app/worker.py``). Here, not beside the code that raises
them, because that code needs torch and the worker must know them before it loads torch."""

from __future__ import annotations


class PrivacyBudgetSpent(RuntimeError):
    """A node refuses a step its privacy budget does not cover."""


class NodeUnfit(RuntimeError):
    """This node cannot take part in the run (its model, data or simulation setup is wrong). The message is
    what the server's setup summary shows for the node: it names the node's partition in simulation (where
    Flower's node ids are random) and says what to fix, without the node's private details."""
