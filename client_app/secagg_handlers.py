"""The client side of secure aggregation (see ``server_app/secagg_round.py`` for the message flow).

After the local step the node encodes its clipped global gradient (quantized, plus its discrete-Gaussian share
of the global noise, ``dpfpl.common.secagg.encoding``) and keeps it on its own disk together with the protocol state
(``ClientSession``): the four messages of a round (three, keyed ahead) may each be served by another process (a
fresh ClientApp, or the node's worker restarted in between), so the state between them lives in one atomically
written file in the node's state directory (mode 0600: it holds this round's private keys). Keys drawn for the
next round wait in a second file of the same form until that round's train message binds them. The clear
gradient never leaves the node; the masked vector does, once.

The file carries a SHA-256 digest of its content. A damaged file (garbage, a write cut short, a bit flip, another
shape) fails the stage that reads it with ``CorruptSessionError``, naming the file: the node answers that stage
with an error, and the server drops it from this round's secure aggregation, as it drops a node that does not
answer (the others' round goes on). The next round's train message starts a fresh session over it, as it does
over a missing one: a damaged file holds no keys this node can still use.

The three later stages need numpy and cryptography only: this module does not import torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from dpfpl.common.atomic import write_json
from dpfpl.common.secagg.encoding import encode_update
from dpfpl.common.secagg.protocol import ClientSession, SecAggError

from .context import MessageContext

SESSION_FILE = "secagg_session.json"
AHEAD_FILE = "secagg_ahead.json"  # keys drawn for the next round, announced in this round's unmasking reply
log = logging.getLogger("dpfpl.client")


class CorruptSessionError(SecAggError):
    """This node's secure-aggregation state file cannot be used: this round's secure aggregation ends for it."""


def session_file(context: MessageContext) -> Path:
    return context.state_dir / SESSION_FILE


def _round_context(config) -> str:
    """The session's context, bound into every share's authenticated data: run, round and group (SecFPP: the
    node's cluster; server_app/secagg_round.py)."""
    return f"{config['run-token']}/{int(config['server-round'])}/g{int(config['secagg-group'])}"


def _digest(content: dict) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _save(path: Path, session: ClientSession, values: np.ndarray) -> None:
    # the digest is of the content as it reads back (JSON has string keys only)
    content = json.loads(json.dumps({"session": session.to_dict(), "values": values.astype(np.int64).tolist()}))
    write_json(path, {**content, "sha256": _digest(content)})
    os.chmod(path, 0o600)


def _read(path: Path) -> tuple[ClientSession, np.ndarray]:
    """The session and encoded input in ``path``; ``CorruptSessionError`` naming the file when it is damaged."""
    try:
        saved = json.loads(path.read_bytes())
        if not isinstance(saved, dict) or set(saved) != {"session", "values", "sha256"}:
            raise ValueError("not a session record (keys session, values, sha256)")
        content = {"session": saved["session"], "values": saved["values"]}
        if saved["sha256"] != _digest(content):
            raise ValueError("its content does not match its SHA-256 digest")
        session = ClientSession.from_dict(saved["session"])
        if not isinstance(session.context, str):
            raise ValueError("the session's context is not a string")
        values = np.asarray(saved["values"], dtype=np.int64)
        if values.ndim != 1:
            raise ValueError(f"the encoded input has shape {values.shape}, not a vector")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError) as err:
        raise CorruptSessionError(
            f"this node's secure-aggregation state {path} is damaged ({type(err).__name__}: {err}): this node "
            "leaves this round's secure aggregation; the next round starts a fresh session"
        ) from err
    return session, values


def _load(path: Path, round_context: str) -> tuple[ClientSession, np.ndarray]:
    if not path.exists():
        raise SecAggError(
            f"no secure-aggregation state for round '{round_context}' on this node (the train "
            "message of this round never reached it, or its state directory was wiped)"
        )
    session, values = _read(path)
    if session.context != round_context:
        raise SecAggError(
            f"this node's secure-aggregation state is for round '{session.context}', the request for '{round_context}'"
        )
    return session, values


def _encoded(context: MessageContext, global_grad: np.ndarray) -> np.ndarray:
    """This node's input to the sum: its clipped gradient, quantized, plus its share of the global noise."""
    cfg, config = context.cfg, context.config
    threshold = int(config["secagg-threshold"])
    return encode_update(
        global_grad,
        bits=cfg.secagg_quantization_bits,
        clip_norm=cfg.max_grad_norm_global,
        batch_size=cfg.batch_size,
        noise_multiplier=float(config["noise-multiplier-global"]) if cfg.dp else 0.0,
        # a node that trusts no aggregator adds all of z_G itself: its masked input is within its epsilon even
        # if a dishonest server unmasks it alone (more noise in the sum, never less)
        noise_share_of=1 if context.node.global_noise == "node" else threshold,
        threshold=threshold,
        num_clients=int(config["secagg-num-clients"]),
    )


def advertise_reply(context: MessageContext, global_grad: np.ndarray, metrics: dict) -> RecordDict:
    """The train reply under secure aggregation, never the gradient: metrics and two public keys, or, when the
    message carries the roster (every member of the group announced its keys last round), metrics and this node's
    encrypted shares."""
    path, config = session_file(context), context.config
    round_context = _round_context(config)
    metrics = MetricRecord({**metrics, "server-round": int(config["server-round"])})
    if "nodes" in config:
        return RecordDict({"metrics": metrics, "secagg": _shares_reply(_keyed_ahead(context, global_grad), config)})
    ahead_file(context).unlink(missing_ok=True)  # keys announced for this round go unused: the round advertises
    try:
        session, values = _load(path, round_context)  # a re-sent train message: same keys, same input
    except SecAggError as err:
        if isinstance(err, CorruptSessionError):
            log.warning("%s; starting round '%s' with a fresh session", err, round_context)
        values = _encoded(context, global_grad)
        session = ClientSession(
            node_id=context.node_id, context=round_context, threshold=int(config["secagg-threshold"])
        )
    c_pk, s_pk = session.advertise()
    _save(path, session, values)
    return RecordDict({"metrics": metrics, "secagg": ConfigRecord({"c-pk": c_pk, "s-pk": s_pk})})


def ahead_file(context: MessageContext) -> Path:
    return context.state_dir / AHEAD_FILE


def _ahead_context(config) -> str:
    """The run and round that keys drawn in this round's unmasking serve: the next round (its group is bound when
    its train message arrives, ``ClientSession.bind``)."""
    return f"{config['run-token']}/{int(config['server-round']) + 1}"


def _keyed_ahead(context: MessageContext, global_grad: np.ndarray) -> tuple[Path, ClientSession, np.ndarray]:
    """This round's session from the keys this node announced last round, bound to this round (once: the file of
    keys drawn ahead is removed as the session takes them over)."""
    path, round_context = session_file(context), _round_context(context.config)
    try:
        session, values = _load(path, round_context)  # a re-sent train message: the shares as sent
    except SecAggError:
        ahead = ahead_file(context)
        if not ahead.exists():
            raise SecAggError(
                f"the server sent round '{round_context}' as keyed ahead, but this node announced no keys for it"
            ) from None
        session, _ = _read(ahead)
        session.bind(round_context)
        values = _encoded(context, global_grad)
        _save(path, session, values)
        ahead.unlink()
    return path, session, values


def _shares_reply(state: tuple[Path, ClientSession, np.ndarray], config) -> ConfigRecord:
    path, session, values = state
    ciphertexts = session.share_keys(_roster(config), int(config["secagg-threshold"]))
    _save(path, session, values)
    order = sorted(ciphertexts)
    return ConfigRecord({"dst": order, "ct": [ciphertexts[d] for d in order]})


def _roster(config) -> dict[int, tuple[bytes, bytes]]:
    nodes, c_pk, s_pk = list(config["nodes"]), list(config["c-pk"]), list(config["s-pk"])
    if not len(nodes) == len(c_pk) == len(s_pk):
        raise SecAggError("the roster's node and key lists differ in length")
    return {int(u): (bytes(c), bytes(s)) for u, c, s in zip(nodes, c_pk, s_pk)}


def share_keys(context: MessageContext) -> RecordDict:
    path, config = session_file(context), context.config
    session, values = _load(path, _round_context(config))
    return RecordDict({"secagg": _shares_reply((path, session, values), config)})


def masked_input(context: MessageContext) -> RecordDict:
    path, config = session_file(context), context.config
    session, values = _load(path, _round_context(config))
    src, ct = list(config["src"]), list(config["ct"])
    if len(src) != len(ct):
        raise SecAggError("the relayed share lists differ in length")
    y = session.masked_input({int(s): bytes(c) for s, c in zip(src, ct)}, [int(u) for u in config["senders"]], values)
    _save(path, session, values)
    return RecordDict({"secagg": ArrayRecord({"masked": Array.from_numpy_ndarray(y)})})


def unmask(context: MessageContext) -> RecordDict:
    path, config = session_file(context), context.config
    session, values = _load(path, _round_context(config))
    b_shares, s_shares = session.unmask([int(u) for u in config["survivors"]], [int(u) for u in config["dropped"]])
    _save(path, session, values)
    record = {
        "b-owner": list(b_shares),
        "b-share": list(b_shares.values()),
        "s-owner": list(s_shares),
        "s-share": list(s_shares.values()),
    }
    if config.get("announce-next", False):
        record["next-c-pk"], record["next-s-pk"] = _announce_next(context)
    return RecordDict({"secagg": ConfigRecord(record)})


def _announce_next(context: MessageContext) -> tuple[bytes, bytes]:
    """Fresh key pairs for the next round, drawn now so that its train message can carry the roster; kept in their
    own file (mode 0600) until that round binds them. A repeated request announces the same keys."""
    path, ahead_context = ahead_file(context), _ahead_context(context.config)
    session = None
    if path.exists():
        try:
            session, _ = _read(path)
        except CorruptSessionError as err:
            log.warning("%s; drawing fresh keys for round '%s'", err, ahead_context)
    if session is None or session.context != ahead_context or session.stage != "advertised":
        session = ClientSession(node_id=context.node_id, context=ahead_context)
    keys = session.advertise()
    _save(path, session, np.zeros(0, dtype=np.int64))
    return keys
