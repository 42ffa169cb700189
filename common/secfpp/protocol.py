"""The secure clustering phase between N users and a server that only relays (SecPC, reconstructed).

Messages of one phase (``context`` = run token / round binds every key and ciphertext to it):
 1. advertise: each user publishes a fresh X25519 public key (clear; the server forwards the roster);
 2. share: user i LCC-encodes its quantized reduced prompt x_i into N shares and sends share j to user j,
    AES-GCM-encrypted under the pairwise key (server relays ciphertext, so it never holds K+T shares of anyone);
 3. Lloyd iteration (repeated): the server publishes the current assignment (public sizes n_s); holder j
    computes, for every user i and cluster s, g_{i,s,j} = sum_coord (n_s [x_i]_j - [S_s]_j)^2 (degree 2 in the
    shares, [S_s]_j the coded cluster sum) and sends user i its C values encrypted; user i decodes its own row
    n_s^2 ||x_i - c_s||^2 from 2(K+T-1)+1 holders and reports only (argmin, far bit) to the server
    (``kmeans.decide``); the server applies ``kmeans.next_assignment``.
What the server learns: the public keys, the sizes of ciphertexts, the assignment and the far bits.
What user i learns: its own scaled distances to every cluster centre (and, as any LCC decoder does, the
interpolated polynomial, see docs/secfpp.md). Up to T colluding users see < K+T shares of anyone: nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..secagg import crypto
from ..secagg.protocol import min_group_size
from .kmeans import ClusteringResult, Decision, adaptive_kmeans, counts, decide, threshold_units
from .lcc import Lcc, LccParameterError
from .quantize import check_range, from_field, quantize, to_field

if TYPE_CHECKING:
    from ..config import RunConfig

PURPOSE = "secfpp"


def _pack(values: np.ndarray) -> bytes:
    return np.array([int(v) for v in np.asarray(values).reshape(-1)], dtype="<u8").tobytes()


def _unpack(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<u8").astype(object)


@dataclass
class Relay:
    """The server: it forwards what it is given and keeps a log of every byte it saw (tests inspect it)."""

    log: list[dict] = field(default_factory=list)

    def relay(self, src: int, dst: int, kind: str, ciphertext: bytes) -> bytes:
        self.log.append({"kind": kind, "src": src, "dst": dst, "payload": ciphertext})
        return ciphertext

    def receive(self, src: int, kind: str, payload) -> object:
        """A clear message addressed to the server itself (public keys, decisions)."""
        self.log.append({"kind": kind, "src": src, "dst": None, "payload": payload})
        return payload


class ClusteringClient:
    """One user's side of the phase. Its reduced prompt never leaves it in clear."""

    def __init__(
        self, index: int, reduced: np.ndarray, lcc: Lcc, bits: int, context: str, rng: np.random.Generator | None = None
    ) -> None:
        self.index, self.lcc, self.bits, self.context, self.rng = index, lcc, bits, context, rng
        self.point = quantize(reduced, bits)
        self._private = crypto.generate_private_key()
        self.public = crypto.public_key(self._private)
        self._keys: dict[int, bytes] = {}
        self._shares: dict[int, np.ndarray] = {}  # the shares this user holds, by owner
        self.last_row: list[int] = []

    def to_dict(self) -> dict:
        """The state between the messages of a phase (a deployed node runs each message in a fresh process).
        It holds this phase's private key and the shares of others: the node keeps it on its own disk only."""
        lcc = self.lcc
        return {
            "index": self.index,
            "bits": self.bits,
            "context": self.context,
            "lcc": [lcc.num_holders, lcc.num_slices, lcc.privacy, lcc.degree, lcc.prime],
            "point": [int(v) for v in self.point],
            "private": self._private.hex(),
            "roster": {str(k): v.hex() for k, v in getattr(self, "roster", {}).items()},
            "shares": {str(k): [int(x) for x in v] for k, v in self._shares.items()},
            "own-coded": None if getattr(self, "_own_coded", None) is None else [int(x) for x in self._own_coded],
        }

    @classmethod
    def from_dict(cls, data: dict) -> ClusteringClient:
        self = cls.__new__(cls)
        self.index, self.bits, self.context, self.rng = int(data["index"]), int(data["bits"]), data["context"], None
        self.lcc = Lcc(*[int(v) for v in data["lcc"]])
        self.point = np.asarray(data["point"], dtype=np.int64)
        self._private = bytes.fromhex(data["private"])
        self.public = crypto.public_key(self._private)
        self._keys = {}
        self.roster = {int(k): bytes.fromhex(v) for k, v in data["roster"].items()}
        self._shares = {int(k): np.array(v, dtype=object) for k, v in data["shares"].items()}
        self._own_coded = None if data["own-coded"] is None else np.array(data["own-coded"], dtype=object)
        self.last_row = []
        return self

    def _key(self, peer: int, roster: dict[int, bytes]) -> bytes:
        if peer not in self._keys:
            self._keys[peer] = crypto.agree(
                self._private, roster[peer], crypto.pair_info(PURPOSE, self.context, self.index, peer)
            )
        return self._keys[peer]

    def _ad(self, kind: str, src: int, dst: int) -> bytes:
        return f"{PURPOSE}/{self.context}/{kind}/{src}/{dst}".encode()

    def share(self, roster: dict[int, bytes]) -> dict[int, bytes]:
        """Encrypted LCC shares of this user's point, one per other user (its own share stays here)."""
        self.roster = roster
        shares = self.lcc.encode(to_field(self.point, self.lcc.prime), self.rng)
        self._shares[self.index] = shares[self.index]
        return {
            j: crypto.encrypt(self._key(j, roster), _pack(shares[j]), self._ad("share", self.index, j))
            for j in roster
            if j != self.index
        }

    def receive_shares(self, ciphertexts: dict[int, bytes]) -> None:
        for src, ct in ciphertexts.items():
            self._shares[src] = _unpack(
                crypto.decrypt(self._key(src, self.roster), ct, self._ad("share", src, self.index))
            )

    def coded_distances(self, assignment: list[int], round_id: int) -> dict[int, bytes]:
        """For each user i (by index): the C coded values g_{i,s,self}, encrypted for i."""
        p, sizes = self.lcc.prime, counts(assignment)
        owners = sorted(self._shares)
        held = np.stack([self._shares[o] for o in owners])  # (N, m) object array
        sums = np.stack(
            [held[[k for k, o in enumerate(owners) if assignment[o] == s]].sum(0) % p for s in range(len(sizes))]
        )
        out, own = {}, None
        for k, i in enumerate(owners):
            diff = (np.array(sizes, dtype=object)[:, None] * held[k][None, :] - sums) % p
            g = (diff * diff).sum(1) % p
            if i == self.index:
                own = g
            else:
                out[i] = crypto.encrypt(self._key(i, self.roster), _pack(g), self._ad(f"dist{round_id}", self.index, i))
        self._own_coded = own
        return out

    def decide(
        self,
        ciphertexts: dict[int, bytes],
        assignment: list[int],
        round_id: int,
        threshold: int,
        exclude: frozenset[int] = frozenset(),
    ) -> Decision:
        """Decode this user's row from the holders' coded values (its own included); report only the decision."""
        results = {
            h: _unpack(crypto.decrypt(self._key(h, self.roster), ct, self._ad(f"dist{round_id}", h, self.index)))
            for h, ct in ciphertexts.items()
        }
        results[self.index] = self._own_coded
        holders = sorted(results)
        decoded = self.lcc.decode(holders, np.stack([results[h] for h in holders]), degree=2)  # (K, C)
        row = [from_field(int(v), self.lcc.prime) for v in decoded.sum(0) % self.lcc.prime]
        self.last_row = row
        return decide(row, counts(assignment), threshold, exclude)


def validate(
    num_users: int, reduced_dim: int, num_slices: int, privacy: int, bits: int, prime: int = crypto.PRIME
) -> Lcc:
    """Every parameter of a phase, checked before any work: thresholds, field size, no wrap-around."""
    lcc = Lcc(num_users, num_slices, privacy, degree=2, prime=prime)
    if prime >= 2**64:
        raise LccParameterError("the wire format packs field elements in 64 bits: use a prime below 2^64")
    if num_slices > reduced_dim:
        raise LccParameterError(f"K = {num_slices} slices of a {reduced_dim}-dimensional vector: K must be <= d'")
    check_range(reduced_dim, num_users, bits, prime)
    return lcc


def check_run_config(cfg: RunConfig) -> None:
    """A SecFPP run's parameters, refused where a run starts (before any node does work): the phase must decode
    (2(K+T-1)+1 <= N) and must not wrap around with all N clients, and with secure aggregation, where each
    cluster is its own secure-aggregation group, a cluster must be large enough to be summed. Other methods
    ignore the secfpp keys. With num-clients 0 (as many as the federation has) the decoding check waits until
    the ServerApp has counted the nodes and checks the resolved config again."""
    if cfg.method != "secfpp":
        return
    if cfg.num_clients:
        validate(
            cfg.num_clients,
            cfg.secfpp_reduced_dim,
            cfg.secfpp_slices,
            cfg.secfpp_privacy,
            cfg.secfpp_quantization_bits,
        )
    if cfg.secure_aggregation:
        need = min_group_size(cfg.secagg_dropout_tolerance)
        if cfg.secfpp_min_cluster_size < need:
            raise ValueError(
                f"method 'secfpp' with secure-aggregation = true sums each cluster on its own, and a sum that "
                f"tolerates {cfg.secagg_dropout_tolerance} dropout(s) needs at least {need} members: set "
                f"secfpp-min-cluster-size >= {need} (smaller clusters are then dissolved) or lower "
                "secagg-dropout-tolerance"
            )


def secure_clustering(
    reduced: list[np.ndarray],
    *,
    num_slices: int,
    privacy: int,
    bits: int,
    lam: float,
    max_clusters: int,
    max_iter: int,
    context: str,
    relay: Relay | None = None,
    prime: int = crypto.PRIME,
    initial: list[int] | None = None,
    min_size: int = 2,
    rng: np.random.Generator | None = None,
) -> tuple[ClusteringResult, list[ClusteringClient], Relay]:
    """Run one phase in-process among ``len(reduced)`` users with ``relay`` as the server."""
    n = len(reduced)
    lcc = validate(n, len(reduced[0]), num_slices, privacy, bits, prime)
    relay = relay or Relay()
    clients = [ClusteringClient(i, r, lcc, bits, context, rng) for i, r in enumerate(reduced)]
    roster = {c.index: relay.receive(c.index, "public-key", c.public) for c in clients}
    outgoing = {c.index: c.share(roster) for c in clients}
    for c in clients:
        c.receive_shares(
            {src: relay.relay(src, c.index, "share", cts[c.index]) for src, cts in outgoing.items() if src != c.index}
        )
    threshold = threshold_units(lam, bits)
    counter = iter(range(1, 10**9))

    def decisions(assignment: list[int], exclude: frozenset[int]) -> list[Decision]:
        round_id = next(counter)
        coded = {c.index: c.coded_distances(assignment, round_id) for c in clients}
        out = []
        for c in clients:
            received = {
                h: relay.relay(h, c.index, "coded-distances", cts[c.index]) for h, cts in coded.items() if h != c.index
            }
            d = c.decide(received, assignment, round_id, threshold, exclude)
            out.append(relay.receive(c.index, "decision", d))
        return out

    result = adaptive_kmeans(n, decisions, threshold, max_clusters, max_iter, initial, min_size)
    return result, clients, relay
