"""Seconds per round of the same silo-mode DP-FPL run in Flower's simulation engine, for comparison with
the deployment test (``pytest -s -m deployment`` prints its rounds). Writes the silos like the test does.

    python -m dpfpl.bench.deployment_vs_simulation
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from dpfpl.bench.step import _write_silo
from dpfpl.common.pretrained import DEMO_MODEL
from dpfpl.launch import run_simulation

CLASSES = ["circle", "square", "stripes", "dots", "cross", "ring"]  # the deployment test's classes and silos


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i in range(3):
            _write_silo(tmp / "silos" / str(i), CLASSES[2 * i : 2 * i + 2], 12, 4, seed=i)
        config = {
            "dataset": "silo",
            "classnames": ",".join(CLASSES),
            "silo-root": str(tmp / "silos"),
            "model-name": DEMO_MODEL,
            "pretrained": "none",
            "num-clients": 3,
            "min-clients": 3,
            "num-server-rounds": 2,
            "eval-every": 1,
            "batch-size": 8,
            "target-epsilon": 1.0,
            "run-dir": str(tmp / "run"),
            "resume": False,
        }
        started = time.time()
        run_simulation(config, 3, tmp, stream=False, timeout=900)
        print(f"simulation run wall time {time.time() - started:.1f} s")
        from dpfpl.common.metrics import read_metrics_log

        for r in read_metrics_log(tmp / "run" / "metrics.jsonl"):
            print(f"simulation round {r['round']}: {r.get('round-seconds', '-')} s")


if __name__ == "__main__":
    main()
