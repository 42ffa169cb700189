"""What leaves a node: every field of every reply, each with its class and the reason for it.

Three classes, as docs/privacy.md states them:

* ``covered``: a noisy release the printed epsilon accounts for;
* ``public``: public by declaration or by the protocol -- configuration the node was told or declared, protocol
  bookkeeping, public keys, ciphertexts that only the addressed node can open, and numbers computed from those
  alone (an epsilon is a function of z, q and the step count, none of them data);
* ``outside``: data-dependent and **not** covered by epsilon; each one is named in the run summary,
  ``dpfpl report``, the export manifest and docs/privacy.md.

The ClientApp checks every reply against this inventory before it leaves (``check_reply``): a field that is
not listed here is an error, so a new metric cannot slip onto the wire without a decision written down.
Flower imports stay out of this module: it is read by the server and the tools as well.
"""

from __future__ import annotations

from collections.abc import Iterable

COVERED, PUBLIC, OUTSIDE = "covered", "public", "outside"

_PUBLIC_PROTOCOL = "protocol bookkeeping: the round and run the reply answers"
_KEY = "the node's stable identity key (random, drawn once, unrelated to the data)"
_DECLARED_Q = "the node's sample rate, public by declaration (node or run config), never its training-set size"
_BOOKS = "a function of z_L, z_G, q and the step count alone (all public), so it reveals nothing more"
_TEST_METRICS = (
    "evaluation on the node's own test records (accuracy, loss), without noise; not covered by epsilon. Test "
    "records are records too: an organization that must protect them runs with evaluation = 'validation' or "
    "does not evaluate (eval-every past the last round)"
)
_NO_DP_ONLY = "sent only when dp = false (no guarantee is claimed then); never under DP or secure aggregation"
_CLUSTERING = (
    "SecFPP's clustering: computed from the training features without noise; its shares are secret-shared "
    "(no single party learns them) but the cluster decision shapes which p_G a node receives; not covered"
)
_SECAGG = "secure aggregation: a public key, an encrypted share for one peer, or a share of a mask seed"

_NODE_METRICS = {  # in every train and evaluate reply
    "server-round": (PUBLIC, _PUBLIC_PROTOCOL),
    "run-tag": (PUBLIC, _PUBLIC_PROTOCOL),
    "node-key": (PUBLIC, _KEY),
    "sample-rate": (PUBLIC, _DECLARED_Q),
    "noisy-steps": (PUBLIC, "how many steps the node took: one per train message the server sent"),
}
_TRAIN_METRICS = {
    **_NODE_METRICS,
    "noise-multiplier-local": (PUBLIC, "z_L, calibrated from the target, the declared q and the planned rounds"),
    "noise-multiplier-global-node": (PUBLIC, "the z_G a node that trusts no aggregator added to global-grad itself"),
    "epsilon-local": (PUBLIC, _BOOKS),
    "epsilon-published": (PUBLIC, _BOOKS),
    "clientapp-age-seconds": (PUBLIC, "the ClientApp process's start-up time, before any data is read"),
    "train-loss": (OUTSIDE, _NO_DP_ONLY),
    "batch-size": (OUTSIDE, _NO_DP_ONLY),
    "client-seconds": (OUTSIDE, _NO_DP_ONLY),
}
_EVALUATE_METRICS = {
    **_NODE_METRICS,
    "partition-id": (PUBLIC, "simulation only: the partition the simulation assigned"),
    **{
        key: (OUTSIDE, _TEST_METRICS)
        for key in ("local-acc", "neighbor-acc", "base-acc", "novel-acc", "hm", "local-loss")
    },
}

# (operation, record, key) -> (class, why). Operations are the ClientApp's (client_app/request.py OPERATIONS).
INVENTORY: dict[tuple[str, str, str], tuple[str, str]] = {
    **{("train", "metrics", k): v for k, v in _TRAIN_METRICS.items()},
    ("train", "arrays", "global-grad"): (
        COVERED,
        "the clipped gradient sum / B; the server adds the global noise (central DP, trusted aggregator), or the "
        "node adds it itself before it leaves (global-noise = node)",
    ),
    ("train", "secagg", "c-pk"): (PUBLIC, _SECAGG),
    ("train", "secagg", "s-pk"): (PUBLIC, _SECAGG),
    ("train", "secagg", "dst"): (PUBLIC, _SECAGG),  # keyed ahead: the train reply carries the shares
    ("train", "secagg", "ct"): (PUBLIC, _SECAGG),
    **{("evaluate", "metrics", k): v for k, v in _EVALUATE_METRICS.items()},
    ("train.secagg_shares", "secagg", "dst"): (PUBLIC, _SECAGG),
    ("train.secagg_shares", "secagg", "ct"): (PUBLIC, _SECAGG),
    ("train.secagg_masked", "secagg", "masked"): (
        COVERED,
        "the quantized gradient plus this node's discrete-Gaussian noise share, masked: only the noised sum opens",
    ),
    **{
        ("train.secagg_unmask", "secagg", k): (PUBLIC, _SECAGG)
        for k in ("b-owner", "b-share", "s-owner", "s-share", "next-c-pk", "next-s-pk")
    },
    ("train.secfpp_keys", "secfpp", "pk"): (PUBLIC, "SecFPP: this phase's public key"),
    ("train.secfpp_keys", "secfpp", "node-key"): (PUBLIC, _KEY),
    ("train.secfpp_shares", "secfpp", "dst"): (PUBLIC, "SecFPP: the peers the shares are for"),
    ("train.secfpp_shares", "secfpp", "ct"): (OUTSIDE, _CLUSTERING),
    ("train.secfpp_distances", "secfpp", "dst"): (PUBLIC, "SecFPP: the peers the shares are for"),
    ("train.secfpp_distances", "secfpp", "ct"): (OUTSIDE, _CLUSTERING),
    ("train.secfpp_decide", "secfpp", "cluster"): (OUTSIDE, _CLUSTERING),
    ("train.secfpp_decide", "secfpp", "far"): (OUTSIDE, _CLUSTERING),
    ("query.node_key", "identity", "node-key"): (PUBLIC, _KEY),
}

# Data-dependent things that leave a node that are not reply fields. Timing: a reply's arrival time depends on
# the node's compute, which grows with its Poisson batch; nothing pads it.
REPLY_TIMING = (
    "when a reply arrives: a node's step time grows with its Poisson batch, and nothing pads it, so the "
    "arrival time is a data-dependent side channel outside epsilon (the reply itself carries no timing under DP)"
)


class UnclassifiedField(RuntimeError):
    """A reply field that the inventory does not list: the node does not send it."""


def reply_fields(records: dict[str, Iterable[str]]) -> list[tuple[str, str]]:
    """(record, key) pairs of a reply, from a {record name: keys} view of its content."""
    return [(record, key) for record, keys in records.items() for key in keys]


def check_reply(operation: str, records: dict[str, Iterable[str]]) -> None:
    """Raise ``UnclassifiedField`` for any field of a reply that the inventory does not classify."""
    unknown = [(r, k) for r, k in reply_fields(records) if (operation, r, k) not in INVENTORY]
    if unknown:
        raise UnclassifiedField(
            f"the {operation} reply would carry fields that no privacy class covers: "
            + ", ".join(f"{r}/{k}" for r, k in unknown)
            + "; the node does not send them (classify them in dpfpl/common/wire.py first)"
        )


def outside_epsilon(method: str, dp: bool, evaluates: bool = True) -> list[str]:
    """What the summary, the report and the export manifest list as not covered by epsilon, for a run."""
    if not dp:
        return []
    out = []
    if evaluates:
        out.append("evaluation replies: " + _TEST_METRICS)
    if method == "secfpp":
        out.append(_CLUSTERING)
    out.append("reply timing: " + REPLY_TIMING)
    return out
