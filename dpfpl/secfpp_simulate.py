"""SecFPP end to end in one process: real nodes (``dpfpl.client_app.node.PromptNode``: their data, their on-disk
state, the shared training engine), one global prompt per cluster at the server, and the secure clustering
phase (``protocol.secure_clustering``) every R rounds with the server as a logging relay.

Why a Flower-free loop next to the Flower wiring (``server_app/secfpp_round.py``, ``client_app/secfpp_handlers.py``):
the server here is a ``protocol.Relay`` that logs every byte it relays, which the tests inspect, and it runs
without serialization; the same loop with ``cluster = False`` is the single-global-prompt baseline. The
numbers in docs/secfpp.md come from the Flower app (``dpfpl sweep``); this loop cross-checks them.

Round r:
 1. node i trains one step on P_G,c(i) + its local part, and sends its clipped global gradient (as in the
    central mode of every method here);
 2. the server steps each cluster's P_G with the mean of its members' gradients (``strategy.global_update``);
 3. if r % R == 0: every node computes its clustering vector v_i, its domain gradient
    (``signal.domain_gradient``) at the public initial prompt (on the node; it leaves only as LCC shares), and
    the phase runs on the reduced, normalized v_i (warm start: the last assignment); a new cluster's P_G
    starts as the mean of its members' previous cluster prompts. Why the initial prompt and not each node's
    current cluster prompt: vectors measured at different cluster prompts are not comparable, and measured
    on the embedded default the clusters then kept splitting (ARI 1.0 after the first phase, 0.67 after the
    third); the public prompt is the same reference point for everybody.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

from .client_app.node import PromptNode
from .common.config import NodeConfig, RunConfig
from .common.node_data import run_partition
from .common.prompt import initial_global_prompt
from .common.secfpp.clustering_signal import domain_gradient
from .common.secfpp.protocol import Relay, check_run_config, secure_clustering
from .common.secfpp.reduce import public_basis, reduce
from .server_app.strategy import global_noise_multiplier, global_update

log = logging.getLogger("dpfpl.secfpp")


@dataclass
class SecfppRun:
    """What a simulated run reports (docs/secfpp.md, tests)."""

    method: str
    clustered: bool
    assignments: list[list[int]] = field(default_factory=list)  # after each clustering phase
    num_clusters: list[int] = field(default_factory=list)
    phase_seconds: list[float] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)  # {"round", "local-acc", "per-client"}
    domains: list[int] | None = None
    relay_bytes: list[int] = field(default_factory=list)

    def final_local_acc(self, last: int = 1) -> float:
        return float(np.mean([e["local-acc"] for e in self.evaluations[-last:]]))


def adjusted_rand_index(a: list[int], b: list[int]) -> float:
    return float(adjusted_rand_score(a, b))


def run_secfpp(
    cfg: RunConfig, cache: str | None = None, cluster: bool | None = None, relay: Relay | None = None
) -> SecfppRun:
    """Run ``cfg.num_server_rounds`` rounds among ``cfg.num_clients`` nodes; ``cluster`` defaults to
    method == secfpp. ``relay`` (optional) collects everything the server saw in the clustering phases."""
    check_run_config(cfg)
    cluster = cfg.method == "secfpp" if cluster is None else cluster
    n = cfg.num_clients
    nodes = [PromptNode(cfg, NodeConfig(partition_id=k, num_partitions=n, cache_dir=cache)) for k in range(n)]
    method = nodes[0].method
    if not method.shares_global:
        raise ValueError(f"method '{cfg.method}' has no global prompt to cluster or aggregate")
    z_global = global_noise_multiplier(cfg, max(node.sample_rate for node in nodes), method)
    token = secrets.token_hex(8)
    reference = initial_global_prompt(cfg)  # public: every party derives it from the run seed
    prompts = {0: reference.clone()}
    momenta: dict[int, torch.Tensor | None] = {0: None}
    assignment = [0] * n
    basis = None
    noise = torch.Generator().manual_seed(secrets.randbits(63) if cfg.dp else cfg.seed + 17)
    out = SecfppRun(cfg.method, cluster, domains=run_partition(cfg).domains)
    relay = relay if relay is not None else Relay()
    for r in range(1, cfg.num_server_rounds + 1):
        grads = [node.train(prompts[assignment[k]], r, token, z_global).global_grad for k, node in enumerate(nodes)]
        for s in sorted(prompts):
            members = [grads[k] for k in range(n) if assignment[k] == s]
            if members:
                prompts[s], momenta[s], _ = global_update(cfg, prompts[s], momenta[s], members, z_global, noise)
        if cluster and r % cfg.secfpp_every == 0:
            basis, prompts, assignment = _clustering_phase(
                cfg, nodes, reference, basis, prompts, assignment, r, token, relay, out
            )
            momenta = {s: None for s in prompts}
        if r % cfg.eval_every == 0 or r == cfg.num_server_rounds:
            out.evaluations.append(_evaluation(nodes, prompts, assignment, r, token))
    return out


def _clustering_phase(
    cfg: RunConfig,
    nodes: list[PromptNode],
    reference: torch.Tensor,
    basis: np.ndarray | None,
    prompts: dict[int, torch.Tensor],
    assignment: list[int],
    r: int,
    token: str,
    relay: Relay,
    out: SecfppRun,
) -> tuple[np.ndarray, dict[int, torch.Tensor], list[int]]:
    """Round r's clustering phase: each node's clustering vector (on the node), reduced with the public basis
    (drawn at the first phase), the secure clustering on them, and each new cluster's P_G as the mean of its
    members' previous cluster prompts. Returns the basis, the new cluster prompts and the new assignment."""
    # node side: the clustering vector of each node
    vectors = [domain_gradient(node.encoder, reference.to(node.device), node.data.train_features) for node in nodes]
    if basis is None:
        basis = public_basis(vectors[0].size, cfg.secfpp_reduced_dim, cfg.seed)  # public seed
    reduced = [reduce(v, basis) for v in vectors]
    before = len(relay.log)
    started = time.perf_counter()
    result, _, _ = secure_clustering(
        reduced,
        num_slices=cfg.secfpp_slices,
        privacy=cfg.secfpp_privacy,
        bits=cfg.secfpp_quantization_bits,
        lam=cfg.secfpp_threshold,
        max_clusters=cfg.secfpp_max_clusters,
        max_iter=cfg.secfpp_max_iter,
        context=f"{token}/{r}",
        relay=relay,
        initial=assignment,
        min_size=cfg.secfpp_min_cluster_size,
    )
    out.phase_seconds.append(time.perf_counter() - started)
    out.relay_bytes.append(sum(len(e["payload"]) for e in relay.log[before:] if isinstance(e["payload"], bytes)))
    new = result.assignment
    fresh = {}
    for s in range(result.num_clusters):  # the server knows both assignments and every cluster prompt
        members = [k for k in range(len(nodes)) if new[k] == s]
        fresh[s] = torch.stack([prompts[assignment[k]] for k in members]).mean(0)
    out.assignments.append(list(new))
    out.num_clusters.append(result.num_clusters)
    log.info("round %d: %d clusters %s", r, result.num_clusters, new)
    return basis, fresh, new


def _evaluation(
    nodes: list[PromptNode], prompts: dict[int, torch.Tensor], assignment: list[int], r: int, token: str
) -> dict:
    """Every node's local accuracy with its cluster's P_G, and their mean."""
    per = [node.evaluate(prompts[assignment[k]], token) for k, node in enumerate(nodes)]
    return {
        "round": r,
        "local-acc": float(np.mean([m["local-acc"] for m in per])),
        "per-client": [m["local-acc"] for m in per],
    }


def main(argv: list[str] | None = None) -> None:
    """python -m dpfpl.secfpp_simulate --out docs/results/secfpp.json key=value ... (run-config keys)."""
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", default="")
    parser.add_argument("--methods", default="secfpp,dpfpl,promptfl")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    base = {
        k.replace("-", "_"): json.loads(v) if v[:1] in "0123456789-[{tf" and v not in ("-",) else v
        for k, v in (o.split("=", 1) for o in args.overrides)
    }
    results = {}
    for name in args.methods.split(","):
        started = time.time()
        cfg = RunConfig(**{**base, "method": name, "run_dir": f"{base.get('run_dir', 'runs/secfpp')}/{name}"})
        run = run_secfpp(cfg)
        row = {**asdict(run), "local-acc-final": run.final_local_acc(), "seconds": round(time.time() - started, 1)}
        if run.assignments and run.domains is not None:
            row["ari-final"] = adjusted_rand_index(run.assignments[-1], run.domains)
            row["ari-per-phase"] = [adjusted_rand_index(a, run.domains) for a in run.assignments]
        results[name] = row
        print(
            f"{name:10s} local-acc {row['local-acc-final']:.4f}"
            + (f"  ARI {row['ari-final']:.3f}  clusters {run.num_clusters[-1]}" if "ari-final" in row else "")
            + f"  ({row['seconds']} s)",
            flush=True,
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"overrides": args.overrides, "results": results}, indent=1))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
