"""SecFPP at the server: one global prompt per cluster, and the clustering phase, in which it only relays.

Per-cluster prompts (``SecfppStrategy``): each node receives its cluster's P_G (train and evaluate); the
replies are validated as for every method and each cluster's P_G takes the server step
(``strategy.global_update``) with the mean of its members' gradients (with DP: the global noise of a mean
over that cluster's n_s replies). The assignment is kept under each node's stable ``node-key`` (the key the
accountant's books use, ``dpfpl.client_app.state.node_key``), not under Flower's node id, which changes when a
SuperNode restarts or a simulation resumes: before sending a prompt to a node id the server has not heard from
in this process, it asks the node for its key (``query.node_key``, a message that needs no model or data).

The clustering phase (``clustering_phase``), every ``secfpp-every`` rounds after the training round (the
strategy's ``after_aggregation``), custom actions of the ``train`` type routed to ``client_app/secfpp_handlers.py``:

  train.secfpp_keys       index in the roster, N, num-clients -> the node computes/encodes its vector; reply:
                          public key
  train.secfpp_shares     the roster's public keys -> ciphertexts of LCC shares, one per other node
  train.secfpp_distances  (first time: the shares addressed to the node) + the assignment -> ciphertexts of
                          the node's coded distances, one per other node
  train.secfpp_decide     the coded distances addressed to the node + the assignment -> (cluster, far bit)

The last two repeat once per iteration of ``dpfpl.common.secfpp.kmeans.adaptive_kmeans``, which is the server's whole
share of the computation. What the server sees: public keys, ciphertexts (and their sizes), the decisions,
hence the assignment. Dropouts: a node that fails or sends a malformed reply before its shares are out (keys,
shares) leaves the phase, and the others start it over once without it (new roster indices, fresh keys and
shares, under a new phase label; a second such failure aborts the phase and the assignment stays as it was); the
node left out gets cluster 0's prompt until a phase that includes it. After that, a node that fails or does not
answer leaves the phase: the others decode from the coded results that are left (LCC needs 2(K+T-1)+1 of them;
fewer aborts the phase), its vector stays in the cluster sums (its shares are held by the others) and it keeps
its cluster.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from dpfpl.common.metrics import GLOBAL_NOISE_STD
from dpfpl.common.optim import sgd_update
from dpfpl.common.secfpp.kmeans import ClusteringResult, Decision, adaptive_kmeans, threshold_units
from dpfpl.common.secfpp.lcc import LccParameterError
from dpfpl.common.secfpp.protocol import validate

from .exchange import exchange
from .federation import NUM_CLIENTS_KEY
from .replies import InvalidReply, blob, blobs, config_fields, node_ids
from .strategy import PromptStrategy, finite_update, global_learning_rate, global_update, parse_node_key

log = logging.getLogger("dpfpl.server.secfpp")

KEYS, SHARES, DISTANCES, DECIDE = (f"{MessageType.TRAIN}.secfpp_{a}" for a in ("keys", "shares", "distances", "decide"))
IDENTIFY = f"{MessageType.QUERY}.node_key"


class PhaseFailed(RuntimeError):
    pass


class SecfppStrategy(PromptStrategy):
    """PromptStrategy with one global prompt per cluster (state.cluster_prompts, state.assignment by node key)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.node_keys: dict[int, str] = {}  # Flower node id -> node key, as heard in this process
        self.sent_cluster: dict[int, int] = {}  # node id -> the cluster whose prompt it was sent this round

    def after_aggregation(self, grid: Grid, server_round: int) -> dict:
        """Every ``secfpp-every`` rounds, after the round's update: the clustering phase (``clustering_phase``). A
        phase that fails leaves the assignment as it was, and the round's metrics line says so."""
        if server_round % self.cfg.secfpp_every:
            return {}
        return clustering_phase(self, grid, server_round, self.cfg.round_timeout or None) or {
            "secfpp-phase-failed": True
        }

    def published_global_note(self) -> str:
        return "each cluster's final p_G (SecFPP's cluster prompts are not averaged)"

    def key_of(self, node_id: int) -> str:
        return self.node_keys.get(int(node_id), str(node_id))

    def cluster_of(self, node_id: int) -> int:
        return int(self.state.assignment.get(self.key_of(node_id), 0))

    def prompt_of(self, cluster: int) -> torch.Tensor:
        return self.state.cluster_prompts.get(cluster, self.state.p_global)

    def cluster_sent_to(self, node_id: int) -> int:
        """The cluster whose prompt this node was sent this round (its gradient was taken there)."""
        return self.sent_cluster.get(int(node_id), self.cluster_of(node_id))

    def learn_key(self, node_id: int, key: str) -> None:
        if self.node_keys.get(int(node_id), key) != key:
            log.warning("node %s now reports node key %s (was %s)", node_id, key, self.node_keys[int(node_id)])
        self.node_keys[int(node_id)] = key

    def identify(self, grid: Grid, node_ids: list[int]) -> None:
        """Ask every node id not heard from yet for its node key, so that it gets its own cluster's prompt.

        Only needed once there is an assignment: a SuperNode that restarted, or every node of a resumed run. A
        node that does not answer is logged and trains with cluster 0's prompt this round (its gradient then
        goes to cluster 0's update: ``sent_cluster``)."""
        unknown = [n for n in node_ids if int(n) not in self.node_keys]
        if not unknown or not self.state.assignment:
            return
        messages = [
            Message(
                content=RecordDict({"config": ConfigRecord({"run-token": self.state.run_token})}),
                message_type=IDENTIFY,
                dst_node_id=n,
            )
            for n in unknown
        ]
        for reply in exchange(grid, messages, timeout=self.cfg.round_timeout or None):
            node_id = reply.metadata.src_node_id
            try:
                if reply.has_error():
                    raise InvalidReply(f"it reported an error: {reply.error.reason}")
                # the one typed parser, as for every other reply: exactly the record, exactly the key
                identity = config_fields(reply, "identity", {"node-key"})
                self.learn_key(node_id, parse_node_key(identity["node-key"]))
            except InvalidReply as err:
                log.warning("node %s could not be identified (%s); it gets cluster 0's prompt", node_id, err)

    def _messages(
        self, server_round: int, arrays: ArrayRecord | None, config: dict, grid: Grid, message_type: str
    ) -> list[Message]:
        _, node_ids = sample_nodes(grid, self.cfg.min_clients, self.cfg.min_clients)
        self.identify(grid, list(node_ids))
        record = self.round_config(server_round, config)
        self.sent_cluster = {int(n): self.cluster_of(n) for n in node_ids}
        return [
            Message(
                content=RecordDict(
                    {
                        "config": ConfigRecord(record),  # one per node: secure aggregation adds its group
                        "arrays": ArrayRecord({"global-prompt": self.prompt_of(self.sent_cluster[int(n)])}),
                    }
                ),
                message_type=message_type,
                dst_node_id=n,
            )
            for n in node_ids
        ]

    def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self.accept_replies(server_round, replies)
        by_cluster: dict[int, list[torch.Tensor]] = {}
        for reply in accepted:
            self.learn_key(reply.node_id, reply.key)
            by_cluster.setdefault(self.cluster_sent_to(reply.node_id), []).append(reply.payload)
        if not self.enough_replies(server_round, accepted):
            return None, None
        summary = {"secfpp-clusters": float(len(by_cluster))}
        updated = False
        for cluster, grads in sorted(by_cluster.items()):
            prompt, _, std = global_update(
                self.cfg, self.prompt_of(cluster), None, grads, self.state.noise_multiplier_global, self.noise_generator
            )
            if finite_update(server_round, f"cluster {cluster}'s p_G", prompt):  # else it keeps its prompt
                self.state.cluster_prompts[cluster], updated = prompt, True
                summary[f"{GLOBAL_NOISE_STD}-c{cluster}"] = std
        self.state.p_global = self.prompt_of(0)
        booked = self.close_round(accepted)  # every cluster's replies, also those of a refused step
        if not updated:
            return None, None
        return None, MetricRecord({**booked, **summary})

    # secure aggregation (server_app/secagg_round.py): one group per cluster, each with its own sum
    def secagg_groups(self, node_ids: list[int]) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        for n in node_ids:
            groups.setdefault(self.cluster_sent_to(n), []).append(n)
        return groups

    def apply_secure_mean(self, server_round: int, group: int, noisy_mean: torch.Tensor, num_members: int) -> bool:
        lr = global_learning_rate(
            self.cfg, self.state.noise_multiplier_global, num_members, tuple(self.prompt_of(group).shape)
        )
        prompt, _ = sgd_update(self.prompt_of(group), noisy_mean, None, lr, self.cfg.momentum, self.cfg.weight_decay)
        if not finite_update(server_round, f"cluster {group}'s p_G", prompt):
            return False
        self.state.cluster_prompts[group] = prompt
        self.state.p_global = self.prompt_of(0)
        return True

    def group_metrics(self, group: int, values: dict[str, float]) -> dict[str, float]:
        return {f"{k}-c{group}": v for k, v in values.items()}

    def apply_assignment(self, assignment: dict[int, int]) -> None:
        """New clusters (``assignment`` by node id); each starts from the mean of its members' previous cluster
        prompts. Kept by node key."""
        fresh: dict[int, torch.Tensor] = {}
        for cluster in sorted(set(assignment.values())):
            members = [n for n, c in assignment.items() if c == cluster]
            fresh[cluster] = torch.stack([self.prompt_of(self.cluster_of(n)) for n in members]).mean(0)
        self.state.cluster_prompts = fresh
        self.state.assignment = {self.key_of(n): int(c) for n, c in assignment.items()}
        self.state.p_global = self.prompt_of(0)


def _request(
    grid: Grid,
    action: str,
    payloads: dict[int, dict],
    phase: str,
    timeout: float | None,
    tolerate: bool = False,
    roster_size: int | None = None,
) -> dict[int, dict]:
    """Send each node its payload; the replies by node id. ``tolerate``: a node that fails or does not answer
    is logged and left out (the caller decides whether enough are left); otherwise the phase fails."""
    messages = [
        Message(content=RecordDict({"config": ConfigRecord({**p, "phase": phase})}), message_type=action, dst_node_id=n)
        for n, p in payloads.items()
    ]
    replies, problems = {}, []
    for msg in exchange(grid, messages, timeout=timeout):
        node = msg.metadata.src_node_id
        if msg.has_error():
            problems.append(f"node {node} failed in {action}: {msg.error.reason}")
            continue
        try:
            values = config_fields(msg, "secfpp", PHASE_FIELDS[action])
            replies[node] = PHASE_PARSERS[action](values, roster_size or len(payloads))
        except InvalidReply as err:
            problems.append(f"node {node}: {action} reply rejected: {err}")
        except Exception as err:  # noqa: BLE001  a hostile reply is rejected, never fatal
            problems.append(f"node {node}: {action} reply rejected: malformed ({type(err).__name__})")
    missing = set(payloads) - set(replies)
    if missing and not tolerate:
        raise PhaseFailed("; ".join(problems) or f"{len(missing)} node(s) did not answer {action}")
    for problem in problems:
        log.warning("%s; it drops out of this phase", problem)
    return replies


def _addressed(values: dict, num_nodes: int) -> dict:
    """dst (roster indices) and ct (one ciphertext each), checked: the relay uses nothing else."""
    ids = node_ids(values["dst"], "dst", set(range(num_nodes)))
    cts = blobs(values["ct"], "ct", num_nodes)
    if len(ids) != len(cts):
        raise InvalidReply(f"{len(ids)} destinations for {len(cts)} ciphertexts")
    return {"dst": ids, "ct": cts}


def _decision(values: dict, num_nodes: int) -> dict:
    cluster, far = values["cluster"], values["far"]
    if isinstance(cluster, bool) or not isinstance(cluster, int) or not 0 <= cluster < max(num_nodes, 1):
        raise InvalidReply(f"cluster {cluster!r} is not a cluster index")
    if isinstance(far, bool):
        far = int(far)
    if not isinstance(far, int) or far not in (0, 1):
        raise InvalidReply(f"far {far!r} is not 0 or 1")
    return {"cluster": cluster, "far": far}


def _keys(values: dict, num_nodes: int) -> dict:
    return {"pk": blob(values["pk"], "pk", 32), "node-key": parse_node_key(values["node-key"])}


PHASE_FIELDS = {
    KEYS: {"pk", "node-key"},
    SHARES: {"dst", "ct"},
    DISTANCES: {"dst", "ct"},
    DECIDE: {"cluster", "far"},
}
PHASE_PARSERS = {KEYS: _keys, SHARES: _addressed, DISTANCES: _addressed, DECIDE: _decision}


def _misaddressed(nodes: list[int], replies: dict[int, dict]) -> set[int]:
    """The answering nodes that did not address exactly one ciphertext to every other node of the roster."""
    others = set(range(len(nodes)))
    return {
        node
        for src, node in enumerate(nodes)
        if node in replies
        and (
            len(replies[node]["dst"]) != len(replies[node]["ct"])
            or set(int(d) for d in replies[node]["dst"]) != others - {src}
        )
    }


def _route(nodes: list[int], replies: dict[int, dict]) -> dict[int, tuple[list[int], list[bytes]]]:
    """Relay: the ciphertexts each answering node sent, regrouped by destination (roster indices). Opaque
    bytes; a sender must address exactly one ciphertext to every other node of the roster."""
    bad = _misaddressed(nodes, replies)
    if bad:
        raise PhaseFailed(f"node {min(bad)} did not address exactly one ciphertext to every other node")
    inbox: dict[int, tuple[list[int], list[bytes]]] = {i: ([], []) for i in range(len(nodes))}
    for src, node in enumerate(nodes):
        if node not in replies:
            continue
        r = replies[node]
        for dst, ct in zip(r["dst"], r["ct"]):
            inbox[int(dst)][0].append(src)
            inbox[int(dst)][1].append(bytes(ct))
    return inbox


class _ClusteringPhase:
    """One clustering phase's stages, in order (``run``): the roster, the nodes' public keys, the relay of their
    LCC shares, then adaptive k-means, each of whose iterations (``decisions``) is one exchange of coded distances
    and one of decisions. Any stage may raise ``PhaseFailed`` (or a parser's error): the phase then ends and the
    assignment stays as it was (``clustering_phase``)."""

    def __init__(self, strategy: SecfppStrategy, grid: Grid, server_round: int, timeout: float | None) -> None:
        self.strategy, self.grid, self.timeout, self.cfg = strategy, grid, timeout, strategy.cfg
        _, node_ids = sample_nodes(grid, self.cfg.min_clients, self.cfg.min_clients)
        self.nodes = sorted(int(n) for n in node_ids)  # a node's index here is its index in the roster
        self.phase = f"{strategy.state.run_token}/{server_round}"
        self.shares: dict[int, tuple[list[int], list[bytes]]] = {}  # by roster index: (senders, ciphertexts)
        self.alive: set[int] = set()
        self.iteration = 0
        # the coded results a distance decodes from (LCC: 2(K+T-1)+1); fewer left aborts the phase
        self.need = 2 * (self.cfg.secfpp_slices + self.cfg.secfpp_privacy - 1) + 1

    def run(self) -> ClusteringResult:
        cfg = self.cfg
        self.share_vectors()
        self.alive = set(self.nodes)  # every vector is shared by now: a node that drops later stays in the cluster sums
        return adaptive_kmeans(
            len(self.nodes),
            self.decisions,
            threshold_units(cfg.secfpp_threshold, cfg.secfpp_quantization_bits),
            cfg.secfpp_max_clusters,
            cfg.secfpp_max_iter,
            [self.strategy.cluster_of(n) for n in self.nodes],
            cfg.secfpp_min_cluster_size,
        )

    def _request(self, action: str, payloads: dict[int, dict], tolerate: bool = False) -> dict[int, dict]:
        return _request(self.grid, action, payloads, self.phase, self.timeout, tolerate, len(self.nodes))

    def share_vectors(self) -> None:
        """The roster's public keys, then the relay of every node's LCC shares (``self.shares``). A node that fails
        or sends a malformed reply before the shares are out leaves the phase, and the others start over once
        without it: a new phase label, new roster indices, fresh keys and shares (nothing of the first attempt was
        relayed, so no share of it reaches anyone). A failure in the second attempt ends the phase."""
        cfg, first_label = self.cfg, self.phase
        for attempt in (1, 2):
            validate(
                len(self.nodes),
                cfg.secfpp_reduced_dim,
                cfg.secfpp_slices,
                cfg.secfpp_privacy,
                cfg.secfpp_quantization_bits,
            )
            failed = self.keys_and_shares(final=attempt == 2)
            if not failed:
                return
            log.warning(
                "clustering phase %s: node(s) %s failed before the shares were out; the phase starts over without them",
                self.phase,
                ", ".join(str(n) for n in sorted(failed)),
            )
            self.nodes = [n for n in self.nodes if n not in failed]
            self.phase = f"{first_label}/retry"

    def keys_and_shares(self, final: bool) -> set[int]:
        """Keys and shares of the current roster: the nodes that failed either (``final``: none may, the phase fails
        instead)."""
        pks, failed = self.collect_public_keys(tolerate=not final)
        if failed:
            return failed
        replies = self._request(SHARES, {n: {"pks": pks} for n in self.nodes}, tolerate=not final)
        failed = (set(self.nodes) - set(replies)) | _misaddressed(self.nodes, replies)
        if failed and not final:
            return failed
        self.shares = _route(self.nodes, replies)
        return set()

    def collect_public_keys(self, tolerate: bool = False) -> tuple[list[bytes], set[int]]:
        """Each node's public key for this phase, in roster order, and the nodes that gave none or one that cannot
        be attributed (``tolerate``; otherwise the phase fails on them). The roster is also where the assignment learns each node's key; the message carries the run's
        number of clients, as a train message does (the node loads its partition to compute its clustering
        vector)."""
        nodes, strategy = self.nodes, self.strategy
        keys = self._request(
            KEYS,
            {
                n: {"index": i, "num-users": len(nodes), NUM_CLIENTS_KEY: self.cfg.num_clients}
                for i, n in enumerate(nodes)
            },
            tolerate=tolerate,
        )
        # a node key or a public key reported twice cannot be attributed: every holder leaves (a copied state
        # directory, or a node claiming another's key)
        count = Counter(v for n in keys for v in (str(keys[n]["node-key"]), bytes(keys[n]["pk"])))
        shared = {n for n in keys if count[str(keys[n]["node-key"])] > 1 or count[bytes(keys[n]["pk"])] > 1}
        failed = (set(nodes) - set(keys)) | shared
        if failed and tolerate:
            return [], failed
        if shared:
            raise PhaseFailed(
                "two nodes report the same node key or public key (a copied state directory?); each node needs its "
                "own 'node-key' file"
            )
        for n in nodes:
            strategy.learn_key(n, str(keys[n]["node-key"]))
        pks = [bytes(keys[n]["pk"]) for n in nodes]
        if any(len(pk) != 32 for pk in pks):
            raise PhaseFailed("a public key is not 32 bytes")
        return pks, set()

    def decisions(self, assignment: list[int], exclude: frozenset[int]) -> list[Decision]:
        """One k-means iteration: the nodes' coded distances to the current clusters, relayed, then each node's
        decision (its cluster, and whether it is far from every one)."""
        self.iteration += 1
        base = {"assignment": assignment, "iteration": self.iteration}
        coded = self.coded_distances(base)
        decided = self._request(
            DECIDE,
            {
                n: {**base, "src": coded[i][0], "ct": coded[i][1], "exclude": sorted(exclude)}
                for i, n in enumerate(self.nodes)
                if n in self.alive
            },
            tolerate=True,
        )
        self.alive.intersection_update(decided)
        return self.checked_decisions(assignment, exclude, decided)

    def coded_distances(self, base: dict) -> dict[int, tuple[list[int], list[bytes]]]:
        """The coded distances of the nodes still in the phase, regrouped by destination. The first iteration
        also delivers each node the shares addressed to it."""
        first = self.iteration == 1
        replies = self._request(
            DISTANCES,
            {
                n: {**base, **({"src": self.shares[i][0], "ct": self.shares[i][1]} if first else {})}
                for i, n in enumerate(self.nodes)
                if n in self.alive
            },
            tolerate=True,
        )
        self.alive.intersection_update(replies)
        if len(self.alive) < self.need:  # fewer coded results than a distance needs: nobody could decode
            raise PhaseFailed(f"{len(self.alive)} nodes left, a distance needs {self.need} coded results")
        return _route(self.nodes, replies)

    def checked_decisions(
        self, assignment: list[int], exclude: frozenset[int], decided: dict[int, dict]
    ) -> list[Decision]:
        """Every node's decision in roster order; a node that dropped keeps its cluster (unless that cluster is
        being dissolved: then the first other). A decision is all the server can check."""
        allowed = set(range(max(assignment) + 1)) - set(exclude)
        keep = [a if a not in exclude else min(allowed) for a in assignment]
        out = [
            Decision(int(decided[n]["cluster"]), bool(decided[n]["far"])) if n in decided else Decision(keep[i], False)
            for i, n in enumerate(self.nodes)
        ]
        if any(d.cluster not in allowed for d in out):
            raise PhaseFailed("a node reported a cluster that does not exist or is being dissolved")
        return out


def clustering_phase(strategy: SecfppStrategy, grid: Grid, server_round: int, timeout: float | None) -> dict | None:
    """Run one phase; on success apply the new assignment and return what the metrics line records."""
    started = time.time()
    phase = _ClusteringPhase(strategy, grid, server_round, timeout)
    try:
        result = phase.run()
    except (PhaseFailed, LccParameterError, ValueError, TypeError, KeyError, IndexError, OverflowError) as err:
        log.error("round %d: clustering phase failed, the assignment stays as it was: %s", server_round, err)
        return None
    nodes = phase.nodes
    strategy.apply_assignment({n: result.assignment[i] for i, n in enumerate(nodes)})
    log.info("round %d: %d clusters after %d iterations", server_round, result.num_clusters, result.iterations)
    return {
        "secfpp-num-clusters": float(result.num_clusters),
        "secfpp-iterations": float(result.iterations),
        "secfpp-phase-seconds": round(time.time() - started, 3),
        "secfpp-assignment": {str(n): result.assignment[i] for i, n in enumerate(nodes)},
    }
