"""The secure aggregation protocol (Bonawitz et al., CCS 2017, complete-graph variant) as two state machines,
one per side, free of Flower so they are testable on their own. ``server_app/secagg_round.py`` drives them
over Flower messages; ``client_app/secagg_store.py`` keeps a client's state on its disk between messages.

One round, four stages (U1 >= U2 >= U3 >= U4 are the clients still answering at each stage):

1. advertise keys  - each client draws two X25519 key pairs (c: share encryption, s: mask agreement) and
                     sends the public halves. The server sends the roster U1 to everyone.
2. share keys      - each client draws a self-mask seed b_u, Shamir-shares s_sk_u and b_u t-of-|U1|, and
                     encrypts the shares for each other client v under HKDF(X25519(c_sk_u, c_pk_v)); the
                     server relays the ciphertexts it cannot read.
3. masked input    - each client u in U2 decrypts the shares addressed to it, then sends
                     y_u = x_u + PRG(b_u) + sum_{v in U2, v > u} PRG(s_uv) - sum_{v in U2, v < u} PRG(s_uv)
                     in GF(p), with s_uv = HKDF(X25519(s_sk_u, s_pk_v)); x_u is its quantized noisy update.
4. unmasking       - the server names the survivors U3 (their y arrived) and the dropped U2 \\ U3. Each client
                     returns its share of b_v for every survivor and of s_sk_v for every dropped client, never
                     both for one client. With t shares the server rebuilds the b_v (removes the self masks)
                     and the s_sk_v (recomputes and removes the pairwise masks the survivors shared with the
                     dropped), and obtains sum_{u in U3} x_u exactly.

Keys drawn ahead: stage 1 may happen at the end of the previous round (the node draws the next round's keys as it
unmasks, ``ClientSession.bind`` ties them to the round they serve), so that the roster goes out with the round's
first message and stages 1-2 take one exchange (docs/secure-aggregation.md).

Threshold: t = N - dropout_tolerance for the N clients the round was sent to, fixed before the round starts
(the clients calibrate their noise shares for t survivors, so it must not shrink when a client is lost at
stage 1). t >= 2 and t > |U1| / 2 are required (so two disjoint groups of honest clients can never both be
asked, each reaching t, for different secrets of the same client). A round with fewer than t clients at any
stage fails: nothing is unmasked.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from . import crypto, shamir
from .field import field_add, field_neg, field_sub, from_field, is_field_vector, to_field


class SecAggError(RuntimeError):
    """The protocol cannot go on safely; nothing secret was revealed by stopping."""


def check_threshold(t: int, num_clients: int) -> None:
    if t < 2 or 2 * t <= num_clients or t > num_clients:
        raise SecAggError(
            f"threshold {t} for {num_clients} clients: secure aggregation needs 2 <= t <= N and "
            "t > N / 2 (too many clients were lost before the round could start, or the "
            "dropout tolerance is too high)"
        )


def threshold_for(num_clients: int, dropout_tolerance: int) -> int:
    """t = N - dropout_tolerance, checked: at least 2 and more than half of the N clients."""
    t = num_clients - dropout_tolerance
    if t < 2 or 2 * t <= num_clients:
        raise SecAggError(
            f"{num_clients} clients with secagg-dropout-tolerance {dropout_tolerance} give a threshold of {t}; "
            "secure aggregation needs at least 2 and more than half of the clients (tolerate fewer dropouts "
            "or add clients)"
        )
    return t


def min_group_size(dropout_tolerance: int) -> int:
    """The fewest clients for which ``threshold_for`` accepts ``dropout_tolerance``."""
    return max(dropout_tolerance + 2, 2 * dropout_tolerance + 1)


def _sign(u: int, v: int) -> int:
    return 1 if u < v else -1


def _share_plaintext(src: int, dst: int, s_share: bytes, b_share: bytes) -> bytes:
    return struct.pack(">QQ", src, dst) + s_share + b_share


def _aad(context: str, src: int, dst: int) -> bytes:
    return f"dpfpl-secagg/share/{context}/{src}/{dst}".encode()


def pairwise_mask(s_sk: bytes, peer_s_pk: bytes, context: str, me: int, peer: int, size: int) -> np.ndarray:
    seed = crypto.agree(s_sk, peer_s_pk, crypto.pair_info("mask", context, me, peer))
    return crypto.mask(seed, size)


@dataclass
class ClientSession:
    """One client's protocol state for one round (serializable with ``to_dict``/``from_dict``)."""

    node_id: int
    context: str  # run token + round: binds every key, ciphertext and mask to this round
    stage: str = "new"
    c_sk: bytes = b""
    s_sk: bytes = b""
    b_seed: bytes = b""
    roster: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # U1: node -> (c_pk, s_pk)
    threshold: int = 0
    received: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # owner -> (s share, b share)
    masked_with: list[int] = field(default_factory=list)  # U2, the clients whose pairwise masks are in y
    masked: bytes = b""  # y as sent (a repeated request gets the same bytes, never a second input)
    sent: dict[int, bytes] = field(default_factory=dict)  # the share ciphertexts as sent (a repeat gets them again)

    # ---- stage 1
    def advertise(self) -> tuple[bytes, bytes]:
        if self.stage == "new":
            self.c_sk, self.s_sk = crypto.generate_private_key(), crypto.generate_private_key()
            self.stage = "advertised"
        elif self.stage != "advertised":
            raise SecAggError(f"keys requested again after stage '{self.stage}'")
        return crypto.public_key(self.c_sk), crypto.public_key(self.s_sk)

    def bind(self, context: str) -> None:
        """Bind keys drawn ahead (announced in the previous round, under the placeholder ``ahead_context``) to
        this round's full context. Only keys whose public halves are all that left the node can be bound, and only
        to the round they were drawn for: they are then used in that one round, as keys drawn in it would be."""
        if self.stage != "advertised" or not context.startswith(self.context + "/g"):
            raise SecAggError(f"keys drawn for '{self.context}' cannot serve round '{context}' (stage {self.stage})")
        self.context = context

    # ---- stage 2
    def share_keys(self, roster: dict[int, tuple[bytes, bytes]], threshold: int) -> dict[int, bytes]:
        if self.stage == "shared" and roster == self.roster and threshold == self.threshold:
            return dict(self.sent)  # a repeated request: the same ciphertexts, never a second sharing
        if self.stage != "advertised":
            raise SecAggError(f"share-keys request in stage '{self.stage}'")
        mine = (crypto.public_key(self.c_sk), crypto.public_key(self.s_sk))
        if roster.get(self.node_id) != mine:
            raise SecAggError("the roster does not carry this client's own public keys")
        keys = [k for pair in roster.values() for k in pair]
        if len(set(keys)) != len(keys) or any(len(k) != crypto.KEY_BYTES for k in keys):
            raise SecAggError("the roster's public keys are malformed or repeated")
        if self.threshold and threshold != self.threshold:
            raise SecAggError(f"the server changed the threshold from {self.threshold} to {threshold} mid-round")
        check_threshold(threshold, len(roster))
        self.threshold = threshold
        self.roster = dict(roster)
        self.b_seed = crypto.generate_private_key()  # 32 random bytes from the OS
        order = sorted(roster)
        s_shares = shamir.split(self.s_sk, len(order), self.threshold)
        b_shares = shamir.split(self.b_seed, len(order), self.threshold)
        out = {}
        for index, dst in enumerate(order):
            if dst == self.node_id:
                self.received[dst] = (s_shares[index][1], b_shares[index][1])
                continue
            key = crypto.agree(self.c_sk, roster[dst][0], crypto.pair_info("enc", self.context, self.node_id, dst))
            out[dst] = crypto.encrypt(
                key,
                _share_plaintext(self.node_id, dst, s_shares[index][1], b_shares[index][1]),
                _aad(self.context, self.node_id, dst),
            )
        self.stage, self.sent = "shared", dict(out)
        return out

    # ---- stage 3
    def masked_input(self, ciphertexts: dict[int, bytes], masked_with: list[int], values: np.ndarray) -> np.ndarray:
        """y_u for the signed integer vector ``values`` (already quantized and noised)."""
        if self.stage == "masked" and sorted(masked_with) == self.masked_with:
            return np.frombuffer(self.masked, dtype="<u8").copy()  # a repeated request: the same y, no new input
        if self.stage != "shared":
            raise SecAggError(f"masked-input request in stage '{self.stage}'")
        u2 = sorted(set(masked_with))
        if self.node_id not in u2 or not set(u2) <= set(self.roster) or len(u2) < self.threshold:
            raise SecAggError(
                f"the server's list of {len(u2)} share-senders is not a subset of the roster "
                f"containing this client with at least t = {self.threshold} members"
            )
        if set(ciphertexts) != set(u2) - {self.node_id}:
            raise SecAggError("the relayed shares do not come from exactly the other share-senders")
        for src, ciphertext in ciphertexts.items():
            key = crypto.agree(self.c_sk, self.roster[src][0], crypto.pair_info("enc", self.context, src, self.node_id))
            try:
                plain = crypto.decrypt(key, ciphertext, _aad(self.context, src, self.node_id))
            except Exception as err:  # InvalidTag: tampered, replayed into another slot, or another round's
                raise SecAggError(f"the share from node {src} failed authentication") from err
            if struct.unpack(">QQ", plain[:16]) != (src, self.node_id):
                raise SecAggError(f"the share from node {src} is addressed to another pair")
            body = plain[16:]
            self.received[src] = (body[: shamir.SHARE_BYTES], body[shamir.SHARE_BYTES :])
        y = field_add(to_field(values), crypto.mask(self.b_seed, values.size))
        for v in u2:
            if v == self.node_id:
                continue
            m = pairwise_mask(self.s_sk, self.roster[v][1], self.context, self.node_id, v, values.size)
            y = field_add(y, m if _sign(self.node_id, v) > 0 else field_neg(m))
        self.masked_with, self.masked, self.stage = u2, y.astype("<u8").tobytes(), "masked"
        return y

    # ---- stage 4
    def unmask(self, survivors: list[int], dropped: list[int]) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """(shares of b_v for the survivors, shares of s_sk_v for the dropped)."""
        if self.stage not in ("masked", "unmasked"):
            raise SecAggError(f"unmask request in stage '{self.stage}'")
        survivors, dropped = sorted(set(survivors)), sorted(set(dropped))
        if self.stage == "unmasked" and (survivors, dropped) != self._answered:
            raise SecAggError(
                "unmask requested twice with different survivor sets: refused (it could reveal "
                "both secrets of one client)"
            )
        if set(survivors) & set(dropped) or sorted(survivors + dropped) != self.masked_with:
            raise SecAggError("survivors and dropped clients must split the share-senders exactly")
        if self.node_id not in survivors or len(survivors) < self.threshold:
            raise SecAggError(
                f"{len(survivors)} survivors, fewer than the threshold t = {self.threshold}: no share is revealed"
            )
        self.stage, self._answered = "unmasked", (survivors, dropped)
        return ({v: self.received[v][1] for v in survivors}, {v: self.received[v][0] for v in dropped})

    _answered: tuple = ((), ())

    # ---- persistence
    def to_dict(self) -> dict:
        hexed = lambda b: b.hex()  # noqa: E731
        return {
            "node_id": self.node_id,
            "context": self.context,
            "stage": self.stage,
            "c_sk": hexed(self.c_sk),
            "s_sk": hexed(self.s_sk),
            "b_seed": hexed(self.b_seed),
            "threshold": self.threshold,
            "roster": {str(k): [v[0].hex(), v[1].hex()] for k, v in self.roster.items()},
            "received": {str(k): [v[0].hex(), v[1].hex()] for k, v in self.received.items()},
            "masked_with": self.masked_with,
            "masked": hexed(self.masked),
            "answered": [list(self._answered[0]), list(self._answered[1])],
            "sent": {str(k): v.hex() for k, v in self.sent.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> ClientSession:
        session = cls(
            node_id=int(d["node_id"]),
            context=d["context"],
            stage=d["stage"],
            c_sk=bytes.fromhex(d["c_sk"]),
            s_sk=bytes.fromhex(d["s_sk"]),
            b_seed=bytes.fromhex(d["b_seed"]),
            threshold=int(d["threshold"]),
            roster={int(k): (bytes.fromhex(v[0]), bytes.fromhex(v[1])) for k, v in d["roster"].items()},
            received={int(k): (bytes.fromhex(v[0]), bytes.fromhex(v[1])) for k, v in d["received"].items()},
            masked_with=[int(v) for v in d["masked_with"]],
            masked=bytes.fromhex(d["masked"]),
            sent={int(k): bytes.fromhex(v) for k, v in d.get("sent", {}).items()},
        )
        session._answered = (list(d["answered"][0]), list(d["answered"][1]))
        return session


@dataclass
class ServerSession:
    """The server's side of one round: it relays and sums, and learns only sum_{u in U3} x_u."""

    context: str
    threshold: int  # t, fixed when the round is sent (``threshold_for``)
    size: int  # number of coordinates of the aggregated vector
    roster: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    inbox: dict[int, dict[int, bytes]] = field(default_factory=dict)  # dst -> src -> ciphertext
    share_senders: list[int] = field(default_factory=list)
    masked: dict[int, np.ndarray] = field(default_factory=dict)
    unmask_replies: dict[int, tuple[dict[int, bytes], dict[int, bytes]]] = field(default_factory=dict)

    def _need(self, count: int, stage: str) -> None:
        if count < self.threshold:
            raise SecAggError(
                f"{stage}: {count} clients answered, the threshold is {self.threshold}; the round is "
                "abandoned and nothing is unmasked"
            )

    # ---- stage 1
    def set_roster(self, keys: dict[int, tuple[bytes, bytes]]) -> dict[int, tuple[bytes, bytes]]:
        flat = [k for pair in keys.values() for k in pair]
        if any(len(k) != crypto.KEY_BYTES for k in flat) or len(set(flat)) != len(flat):
            raise SecAggError("advertised public keys are malformed or repeated")
        self._need(len(keys), "advertise keys")
        check_threshold(self.threshold, len(keys))
        self.roster = dict(keys)
        return self.roster

    # ---- stage 2
    def collect_shares(self, replies: dict[int, dict[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Per destination, the ciphertexts of every complete share-sender."""
        senders = sorted(u for u, cts in replies.items() if u in self.roster and set(cts) == set(self.roster) - {u})
        self._need(len(senders), "share keys")
        self.share_senders = senders
        self.inbox = {dst: {src: replies[src][dst] for src in senders if src != dst} for dst in senders}
        return self.inbox

    # ---- stage 3
    def collect_masked(self, replies: dict[int, np.ndarray]) -> tuple[list[int], list[int]]:
        for u, y in replies.items():
            if u in self.share_senders and y.shape == (self.size,) and is_field_vector(y):
                self.masked[u] = y
        survivors = sorted(self.masked)
        self._need(len(survivors), "masked input")
        return survivors, sorted(set(self.share_senders) - set(survivors))

    # ---- stage 4
    def unmask(self, replies: dict[int, tuple[dict[int, bytes], dict[int, bytes]]]) -> np.ndarray:
        """The exact signed integer sum of the survivors' inputs."""
        survivors = sorted(self.masked)
        dropped = sorted(set(self.share_senders) - set(survivors))
        replies = {u: r for u, r in replies.items() if u in survivors}
        self._need(len(replies), "unmasking")
        t, order = self.threshold, sorted(self.roster)
        x_of = {node: order.index(node) + 1 for node in order}

        def secret(owner: int, which: int) -> bytes:
            shares = [(x_of[holder], r[which][owner]) for holder, r in replies.items() if owner in r[which]]
            try:
                return shamir.combine(shares, t)
            except shamir.ShamirError as err:
                raise SecAggError(f"cannot rebuild a secret of node {owner}: {err}") from err

        total = np.zeros(self.size, dtype=np.uint64)
        for u in survivors:
            total = field_add(total, self.masked[u])
            total = field_sub(total, crypto.mask(secret(u, 0), self.size))
        for v in dropped:
            s_sk = secret(v, 1)
            if crypto.public_key(s_sk) != self.roster[v][1]:
                raise SecAggError(f"the rebuilt mask key of dropped node {v} does not match its public key")
            for u in survivors:
                m = pairwise_mask(s_sk, self.roster[u][1], self.context, v, u, self.size)
                # u added sign(u, v) * m; remove it
                total = field_sub(total, m) if _sign(u, v) > 0 else field_add(total, m)
        return from_field(total)
