"""Benchmark of the audit (docs/audit.md's table): repeated audits per claimed epsilon (soundness, tightness)
and the same loop without canaries (cost). Not a test: it reports numbers, it asserts nothing.

Run: python scripts/audit_bench.py --epsilons 1,4,8 --seeds 5 --out docs/audit/results.json
     python scripts/audit_bench.py --demo --epsilons 1 --seeds 1 --out docs/audit/results-demo.json  (the
     embedded demo's configuration: 10 clients, 50 rounds, q about 0.05, the pretrained demo backbone)

The loop without canaries runs once untimed first (it loads the model and encodes the features, which the
timed runs then find cached), so that both timings are of warm runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpfpl.audit.run import AuditSettings, run_audit  # noqa: E402
from dpfpl.common.config import RunConfig  # noqa: E402
from dpfpl.inprocess import full_run_config  # noqa: E402
from dpfpl.presets import DEMO_PRESET  # noqa: E402

# the configuration of tests/test_audit.py: 2 nodes of 8 records, q = 1, 10 rounds, n-ctx 16, rank 8, tiny backbone
RUN = {
    "num-clients": 2,
    "classes-per-client": 2,
    "min-clients": 2,
    "num-server-rounds": 10,
    "batch-size": 8,
    "num-shots": 4,
    "sample-rate": 1.0,
    "n-ctx": 16,  # 16 x 128 coordinates: the 1000 canaries interfere little along each other's directions
    "rank": 8,
    "pretrained": "none",
    "dp": True,
    "calibrate-for": "published",
    "run-dir": "runs/dpfpl-audit-bench",  # relative: no machine path in the results it writes
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epsilons", default="1,4,8")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default="docs/audit/results.json")
    parser.add_argument("--demo", action="store_true", help="the embedded demo's configuration instead of CI's")
    args = parser.parse_args()
    run = {**DEMO_PRESET, "run-dir": "runs/dpfpl-audit-bench-demo"} if args.demo else RUN
    rows = []
    for eps in (float(e) for e in args.epsilons.split(",")):
        cfg = RunConfig.from_flower(full_run_config({**run, "target-epsilon": eps}))
        run_audit(cfg, AuditSettings(canaries=args.canaries, with_canaries=False), args.cache_dir)  # warm-up
        base = run_audit(cfg, AuditSettings(canaries=args.canaries, with_canaries=False), args.cache_dir)
        audits = [
            run_audit(cfg, AuditSettings(canaries=args.canaries, seed=s), args.cache_dir) for s in range(args.seeds)
        ]
        row = {
            "epsilon-claimed": audits[0].epsilon_claimed,
            "ceiling": audits[0].ceiling,
            "seeds": args.seeds,
            "canaries": args.canaries,
            "violations": sum(a.violation for a in audits),
            "seconds-without-canaries": base.seconds,
            "seconds-with-canaries-mean": statistics.mean(a.seconds for a in audits),
        }
        for name in ("white-box", "final-prompt"):
            bounds = [next(r for r in a.results if r.threat_model == name).epsilon_lower_bound for a in audits]
            row[name] = {"max": max(bounds), "median": statistics.median(bounds), "all": bounds}
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"run": run, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
