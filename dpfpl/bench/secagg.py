"""Benchmark: the cost of secure aggregation per round vs clear aggregation, protocol level (in memory).

For N simulated clients sharing a d-coordinate global gradient, prints per round:
  msgs      messages (requests + replies) of the training round; clear: one train request + one reply each
  extra     messages secure aggregation adds over clear
  up / down payload bytes client -> server and server -> client for the aggregation itself
            (clear: d float32 per client up; the p_G broadcast down is the same in both modes and left out)
  client s  one client's compute per round (encode: quantize + discrete-Gaussian noise; keys, Shamir shares,
            AES-GCM, ChaCha20 masks), the mean over clients
  server s  the server's compute (clear: the mean of N vectors; secure: relaying, checks and unmasking)
with no dropout and with ~10% of the clients dropping before their masked input (the server then rebuilds
their mask keys and removes their pairwise masks). Wire overhead of Flower's own framing is not included.

    python dpfpl/bench/secagg.py                      # N = 3, 10, 50; d = 16 x 512 (a ViT-B-16 prompt)
    python dpfpl/bench/secagg.py --clients 3 10 --dim 2048
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dpfpl.common.secagg.encoding import encode_update
from dpfpl.common.secagg.protocol import threshold_for
from dpfpl.secagg_simulate import run_round


def clear_round(updates: list[np.ndarray]) -> tuple[int, int, float]:
    t0 = time.perf_counter()
    np.mean(np.stack(updates), axis=0)
    return 2 * len(updates), sum(u.astype(np.float32).nbytes for u in updates), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[3, 10, 50])
    ap.add_argument("--dim", type=int, default=16 * 512)
    ap.add_argument("--bits", type=int, default=16)
    ap.add_argument("--noise-multiplier", type=float, default=1.0)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"d = {args.dim} coordinates, {args.bits}-bit quantization, z_G = {args.noise_multiplier}")
    header = (
        f"{'N':>4} {'drop':>4} {'mode':>6} {'msgs':>6} {'extra':>6} {'up MB':>9} {'down MB':>9} "
        f"{'client s':>9} {'server s':>9}"
    )
    print(header)
    for n in args.clients:
        tolerance = max(1, n // 10) if n >= 3 else 0
        t = threshold_for(n, tolerance)
        updates = [rng.normal(size=args.dim) * 0.05 for _ in range(n)]
        c_msgs, c_up, c_server = clear_round(updates)
        print(f"{n:>4} {0:>4} {'clear':>6} {c_msgs:>6} {0:>6} {c_up / 1e6:>9.3f} {0:>9.3f} {0:>9.4f} {c_server:>9.4f}")
        t0 = time.perf_counter()
        encoded = [
            encode_update(
                u,
                bits=args.bits,
                clip_norm=10.0,
                batch_size=32,
                noise_multiplier=args.noise_multiplier,
                threshold=t,
                num_clients=n,
            )
            for u in updates
        ]
        encode_s = (time.perf_counter() - t0) / n
        ids = [int(i) for i in rng.choice(2**62, size=n, replace=False)]
        inputs = dict(zip(ids, encoded))
        for dropped in (0, tolerance):
            _, stats, _ = run_round(
                inputs, t, context=f"dpfpl/bench/{n}/{dropped}", drop_before_masked=frozenset(ids[:dropped])
            )
            client_s = encode_s + stats.seconds_client / n
            # the train request/reply pair is in both modes: the extra messages are the three added stages
            print(
                f"{n:>4} {dropped:>4} {'secagg':>6} {stats.messages:>6} {stats.messages - c_msgs:>6} "
                f"{stats.bytes_up / 1e6:>9.3f} {stats.bytes_down / 1e6:>9.3f} {client_s:>9.4f} "
                f"{stats.seconds_server:>9.4f}"
            )


if __name__ == "__main__":
    main()
