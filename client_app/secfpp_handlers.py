"""The client side of SecFPP's clustering phase (see ``server_app/secfpp_round.py`` for the message flow).

The node computes its clustering vector (its domain gradient at the public initial prompt, reduced on the
public basis and normalized: ``dpfpl.common.secfpp``), LCC-encodes it and from then on only handles ciphertexts
and field elements; the vector leaves the node only as shares, each encrypted for one other node. The state
between the messages of a phase (this phase's private key, the shares it holds) lives in one file in the
node's state directory (mode 0600), as for secure aggregation: the messages of a phase may each be served by
another process. Only the first message needs torch (the model's gradient): ``client_app/secfpp_vector.py``
computes the vector and hands it to ``advertise_reply``, so that this module stays free of torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from dpfpl.common.atomic import write_json
from dpfpl.common.secfpp.kmeans import threshold_units
from dpfpl.common.secfpp.protocol import ClusteringClient, validate
from dpfpl.common.secfpp.reduce import public_basis, reduce

from .context import MessageContext
from .identity import node_key

SESSION_FILE = "secfpp_session.json"


class SecfppError(RuntimeError):
    pass


def session_file(context: MessageContext) -> Path:
    return context.state_dir / SESSION_FILE


def _save(path: Path, client: ClusteringClient) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, client.to_dict())
    os.chmod(path, 0o600)


def _load(path: Path, phase: str) -> ClusteringClient:
    if not path.exists():
        raise SecfppError(f"no clustering state for phase '{phase}' on this node")
    client = ClusteringClient.from_dict(json.loads(path.read_text()))
    if client.context != phase:
        raise SecfppError(f"this node's clustering state is for phase '{client.context}', the request for '{phase}'")
    return client


def _reply(values: dict) -> RecordDict:
    return RecordDict({"secfpp": ConfigRecord(values)})


def advertise_reply(context: MessageContext, vector: np.ndarray) -> RecordDict:
    """Encode this node's clustering vector (``client_app/secfpp_vector.py``); reply with this phase's public key
    only."""
    cfg, path, config = context.cfg, session_file(context), context.config
    basis = public_basis(vector.size, cfg.secfpp_reduced_dim, cfg.seed)
    lcc = validate(
        int(config["num-users"]),
        cfg.secfpp_reduced_dim,
        cfg.secfpp_slices,
        cfg.secfpp_privacy,
        cfg.secfpp_quantization_bits,
    )
    client = ClusteringClient(
        int(config["index"]), reduce(vector, basis), lcc, cfg.secfpp_quantization_bits, str(config["phase"])
    )
    _save(path, client)
    # the node key lets the server keep this node's cluster across a restart (server_app/secfpp_round.py)
    return _reply({"pk": client.public, "node-key": node_key(context.state_dir)})


def identify(context: MessageContext) -> RecordDict:
    """This node's stable key, so that the server can route its cluster's prompt to a new Flower node id (after a
    restart of the SuperNode or a resumed run). No model, no data: the key is all it reads."""
    return RecordDict({"identity": ConfigRecord({"node-key": node_key(context.state_dir)})})


def share(context: MessageContext) -> RecordDict:
    path, config = session_file(context), context.config
    client = _load(path, str(config["phase"]))
    cts = client.share({i: bytes(pk) for i, pk in enumerate(config["pks"])})
    _save(path, client)
    order = sorted(cts)
    return _reply({"dst": order, "ct": [cts[d] for d in order]})


def distances(context: MessageContext) -> RecordDict:
    path, config = session_file(context), context.config
    client = _load(path, str(config["phase"]))
    if "src" in config:  # the first iteration carries the relayed shares
        client.receive_shares({int(s): bytes(c) for s, c in zip(config["src"], config["ct"])})
    cts = client.coded_distances([int(a) for a in config["assignment"]], int(config["iteration"]))
    _save(path, client)
    order = sorted(cts)
    return _reply({"dst": order, "ct": [cts[d] for d in order]})


def decide(context: MessageContext) -> RecordDict:
    cfg, path, config = context.cfg, session_file(context), context.config
    client = _load(path, str(config["phase"]))
    decision = client.decide(
        {int(s): bytes(c) for s, c in zip(config["src"], config["ct"])},
        [int(a) for a in config["assignment"]],
        int(config["iteration"]),
        threshold_units(cfg.secfpp_threshold, cfg.secfpp_quantization_bits),
        frozenset(int(e) for e in config["exclude"]),
    )
    _save(path, client)
    return _reply({"cluster": decision.cluster, "far": int(decision.far)})
