"""Benchmark: the cost of one SecFPP clustering phase vs the number of clients N and the privacy T.

The phase is run in memory (``dpfpl.common.secfpp.protocol.secure_clustering``) on synthetic unit vectors in d'
dimensions drawn around two domain centres (so the adaptive rule opens a second cluster, as on the demo),
with the real crypto (X25519, AES-GCM) and LCC arithmetic. Prints per phase:
  iters      Lloyd iterations + openings (each is one coded-distance exchange)
  msgs       messages through the server (relayed ciphertexts + clear keys/decisions)
  relayed    ciphertext bytes the server relays, in total and per client (shares + coded distances)
  s/client   one client's compute (all N clients run sequentially in this process: total / N)
  s total    wall time of the whole phase in this process
Flower's own framing and the local training step are not included (the step is measured in dpfpl/bench/step.py;
on the embedded default a phase for N = 10 costs about as much as one training round, see docs/secfpp.md).

    python dpfpl/bench/secfpp.py                       # N = 3, 10, 30; T = 1, 2, 4, 8 where feasible; K = 1
    python dpfpl/bench/secfpp.py --clients 10 --privacy 1 2 --slices 2 --json dpfpl/bench/results/secfpp.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from dpfpl.common.secfpp.lcc import required_results
from dpfpl.common.secfpp.protocol import secure_clustering


def points(n: int, dim: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2, dim))
    out = []
    for i in range(n):
        v = centres[i % 2] / np.linalg.norm(centres[i % 2]) + 0.3 * rng.standard_normal(dim) / np.sqrt(dim)
        out.append(v / np.linalg.norm(v))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[3, 10, 30])
    ap.add_argument("--privacy", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--slices", type=int, default=1)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--bits", type=int, default=16)
    ap.add_argument("--json", default="dpfpl/bench/results/secfpp.json")
    args = ap.parse_args()
    rows = []
    print(f"d' = {args.dim}, K = {args.slices}, q = {args.bits} bits, lambda = 0.3")
    print(
        f"{'N':>4} {'T':>3} {'need':>5} {'iters':>5} {'C':>3} {'msgs':>7} {'relayed MB':>11} {'KB/client':>10} "
        f"{'s/client':>9} {'s total':>8}"
    )
    for n in args.clients:
        for t in args.privacy:
            need = required_results(args.slices, t, 2)
            if need > n:
                continue
            started = time.perf_counter()
            result, _, relay = secure_clustering(
                points(n, args.dim, n),
                num_slices=args.slices,
                privacy=t,
                bits=args.bits,
                lam=0.3,
                max_clusters=4,
                max_iter=10,
                context=f"dpfpl/bench/{n}/{t}",
            )
            seconds = time.perf_counter() - started
            relayed = sum(
                len(e["payload"]) for e in relay.log if isinstance(e["payload"], bytes) and e["dst"] is not None
            )
            row = {
                "clients": n,
                "privacy": t,
                "slices": args.slices,
                "reduced-dim": args.dim,
                "needed": need,
                "iterations": result.iterations,
                "clusters": result.num_clusters,
                "messages": len(relay.log),
                "relayed-bytes": relayed,
                "relayed-bytes-per-client": relayed / n,
                "seconds-total": seconds,
                "seconds-per-client": seconds / n,
            }
            rows.append(row)
            print(
                f"{n:>4} {t:>3} {need:>5} {result.iterations:>5} {result.num_clusters:>3} {len(relay.log):>7} "
                f"{relayed / 1e6:>11.3f} {relayed / n / 1e3:>10.1f} {seconds / n:>9.4f} {seconds:>8.2f}",
                flush=True,
            )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
