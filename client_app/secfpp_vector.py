"""SecFPP's first clustering message on the node: its clustering vector, the one step of the phase that needs the
model (torch). The vector goes straight to the protocol's torch-free side (``client_app/secfpp_handlers.py``), which
encodes it; it leaves the node only as shares there.

A module of its own so that the handler table (``client_app/handlers.py``) loads torch for this message only:
a ClientApp that answers the phase's later messages itself never imports it.
"""

from __future__ import annotations

from flwr.app import RecordDict

from dpfpl.common.prompt import initial_global_prompt
from dpfpl.common.secfpp.clustering_signal import domain_gradient

from . import secfpp_handlers
from .context import MessageContext
from .prompt_handlers import prompt_node


def advertise(context: MessageContext) -> RecordDict:
    """Compute the clustering vector and encode it; reply with this phase's public key only."""
    node = prompt_node(context.cfg, context.node)
    reference = initial_global_prompt(context.cfg)  # public: from the run seed, the same on every party
    vector = domain_gradient(node.encoder, reference.to(node.device), node.data.train_features)
    return secfpp_handlers.advertise_reply(context, vector)
