"""Soak benchmark: one long DP-FPL run on the embedded default (demo data, demo backbone), with the memory of
every process involved sampled while it runs, and its failures counted.

    python dpfpl/bench/soak.py                              # 200 rounds x 10 clients, real Flower simulation
    python dpfpl/bench/soak.py --rounds 50 --runtime inprocess

What "involved" means: with ``--runtime flower`` (default) every process that inherited the launch's tag
(the SuperLink, the ServerApp process, the simulation process and Ray's workers: the ClientApps run there);
with ``inprocess`` this process, which holds server and nodes. Each sample records the RSS and PSS of each
of them and the round the run has reached (lines of metrics.jsonl). The report gives memory by round (total
PSS, whose sum over processes counts shared pages once; total RSS counts them once per process), the growth
of total PSS over the run after warm-up (least-squares slope per 100 rounds over the second half, and last minus first
sample after warm-up), and failures: rounds in which fewer than all clients replied, rounds without an
update, and the run's own status. A table goes to stdout, everything to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dpfpl.common.config import RunConfig  # noqa: E402
from dpfpl.common.metrics import MetricsLogError, read_metrics_log  # noqa: E402
from dpfpl.launch import tagged_processes  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb(pid: int) -> float | None:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20
    except (OSError, IndexError, ValueError):
        return None


def pss_mb(pid: int) -> float | None:
    """Proportional set size: shared pages (torch's libraries, the backbone mapped by every Ray worker) are
    split between the processes that share them, so the sum over processes is the memory really used, where
    the sum of RSS counts shared pages once per process."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except (OSError, IndexError, ValueError):
        pass
    return None


def process_name(pid: int) -> str:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in args if a]
    for w in words:  # the first word that names a Flower/Ray/dpfpl program
        base = Path(w).name
        if base.startswith(("flower-", "flwr", "ray", "raylet", "gcs_server", "dpfpl")) or "ray::" in w:
            return base if "ray::" not in w else w.split()[0]
    return Path(words[0]).name if words else "?"


class Sampler(threading.Thread):
    def __init__(self, pids_of, metrics_file: Path, every: float) -> None:
        super().__init__(daemon=True)
        self.pids_of, self.metrics_file, self.every = pids_of, metrics_file, every
        self.samples: list[dict] = []
        self.stop = threading.Event()
        self.started = time.time()

    def _round(self) -> int:
        try:
            lines = read_metrics_log(self.metrics_file)  # the run is appending to it: a last line may be half written
        except (OSError, MetricsLogError):
            return -1
        return lines[-1]["round"] if lines else -1

    def run(self) -> None:
        while not self.stop.is_set():
            procs = {}
            for pid in self.pids_of():
                mb, pss = rss_mb(pid), pss_mb(pid)
                if mb is not None:
                    procs[str(pid)] = {
                        "name": process_name(pid),
                        "rss_mb": round(mb, 1),
                        "pss_mb": round(pss if pss is not None else mb, 1),
                    }
            self.samples.append(
                {
                    "t": round(time.time() - self.started, 1),
                    "round": self._round(),
                    "total_rss_mb": round(sum(p["rss_mb"] for p in procs.values()), 1),
                    "total_pss_mb": round(sum(p["pss_mb"] for p in procs.values()), 1),
                    "processes": procs,
                }
            )
            self.stop.wait(self.every)


def slope_per_100_rounds(points: list[tuple[int, float]]) -> float:
    n = len(points)
    if n < 2:
        return float("nan")
    mx = sum(r for r, _ in points) / n
    my = sum(m for _, m in points) / n
    var = sum((r - mx) ** 2 for r, _ in points)
    return 100 * sum((r - mx) * (m - my) for r, m in points) / var if var else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--runtime", choices=["flower", "inprocess"], default="flower")
    ap.add_argument("--sample-every", type=float, default=5.0, help="seconds between memory samples")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument(
        "--epsilon",
        type=float,
        default=RunConfig.field_default("target_epsilon"),
        help="target epsilon of the run (PLD-calibrated)",
    )
    ap.add_argument("--work-dir", default=None, help="default: a temporary directory")
    ap.add_argument("--json", default="soak.json")
    ap.add_argument("-c", "--config", action="append", default=[], help="extra run-config KEY=VALUE (JSON value)")
    args = ap.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dpfpl-soak-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "run"
    config = {
        "num-clients": args.clients,
        "min-clients": args.clients,
        "num-server-rounds": args.rounds,
        "eval-every": args.eval_every,
        "eval-last": 0,
        "target-epsilon": args.epsilon,
        "run-dir": str(run_dir),
        "resume": False,
        "round-timeout": 600.0,
    }
    for item in args.config:
        key, value = item.split("=", 1)
        config[key] = json.loads(value)

    tag = uuid.uuid4().hex
    me = os.getpid()
    pids_of = (lambda: tagged_processes(tag)) if args.runtime == "flower" else (lambda: [me])
    sampler = Sampler(pids_of, run_dir / "metrics.jsonl", args.sample_every)
    sampler.start()
    status, error = "completed", None
    started = time.time()
    try:
        if args.runtime == "flower":
            from dpfpl.launch import run_simulation

            run_simulation(config, args.clients, work, stream=False, timeout=24 * 3600, tag=tag)
        else:
            from dpfpl.inprocess import run_inprocess

            run_inprocess(config, args.clients)
    except Exception as err:  # noqa: BLE001 - a failed run is a result of the soak, reported below
        status, error = "failed", f"{type(err).__name__}: {err}"
    wall = time.time() - started
    sampler.stop.set()
    sampler.join()

    metrics = read_metrics_log(run_dir / "metrics.jsonl")
    train = [m for m in metrics if m.get("phase") == "train"]
    short = [m["round"] for m in train if m.get("num-replies", 0) < args.clients]
    not_updated = [m["round"] for m in train if not m.get("updated", False)]
    # samples while rounds run: once the last round's line is written the run shuts down (its processes exit)
    samples = [s for s in sampler.samples if s["processes"] and s["round"] < args.rounds]
    warm = max(1, args.rounds // 10)  # the first tenth of the rounds: imports, caches, Ray start-up
    after = [s for s in samples if s["round"] >= warm]
    half = [(s["round"], s["total_pss_mb"]) for s in samples if s["round"] >= args.rounds // 2]
    by_round = []
    for mark in sorted({0, 1, warm, *range(0, args.rounds, max(1, args.rounds // 8)), args.rounds - 1}):
        at = [s for s in samples if s["round"] == mark] or [s for s in samples if s["round"] >= mark][:1]
        if at:
            s = at[0]
            by_round.append(
                {
                    "round": mark,
                    "t": s["t"],
                    "total_pss_mb": s["total_pss_mb"],
                    "total_rss_mb": s["total_rss_mb"],
                    "processes": len(s["processes"]),
                    "largest_rss_mb": max(p["rss_mb"] for p in s["processes"].values()),
                }
            )
    report = {
        "runtime": args.runtime,
        "rounds": args.rounds,
        "clients": args.clients,
        "status": status,
        "error": error,
        "wall_s": round(wall, 1),
        "rounds_done": train[-1]["round"] if train else 0,
        "mean_round_s": round(sum(m.get("round-seconds", 0) for m in train) / len(train), 3) if train else None,
        "failures": {"rounds_with_missing_replies": short, "rounds_without_update": not_updated, "run_status": status},
        "pss_mb": {
            "peak_total": max((s["total_pss_mb"] for s in samples), default=None),
            "peak_total_rss": max((s["total_rss_mb"] for s in samples), default=None),
            "after_warmup_first": after[0]["total_pss_mb"] if after else None,
            "after_warmup_last": after[-1]["total_pss_mb"] if after else None,
            "growth_after_warmup": round(after[-1]["total_pss_mb"] - after[0]["total_pss_mb"], 1) if after else None,
            "slope_per_100_rounds_second_half": round(slope_per_100_rounds(half), 2),
            "after_warmup_min": min((s["total_pss_mb"] for s in after), default=None),
            "after_warmup_max": max((s["total_pss_mb"] for s in after), default=None),
        },
        "final_epsilon": {
            k: train[-1].get(k) for k in ("epsilon-local-max", "epsilon-global-max", "epsilon-published-max")
        }
        if train
        else {},
        "by_round": by_round,
        "config": {**config, "run-dir": "<work-dir>/run"},  # no machine path in a committed result
        "samples": samples,
    }
    Path(args.json).write_text(json.dumps(report, indent=1))

    print(
        f"\nsoak: {args.runtime}, {args.rounds} rounds x {args.clients} clients: {status} in {wall:.0f} s "
        f"({report['mean_round_s']} s/round){'; ' + error if error else ''}"
    )
    print(f"{'round':>6} {'t (s)':>8} {'procs':>6} {'total PSS (MB)':>15} {'total RSS (MB)':>15} {'largest RSS':>12}")
    for row in by_round:
        print(
            f"{row['round']:>6} {row['t']:>8.0f} {row['processes']:>6} {row['total_pss_mb']:>15.1f} "
            f"{row['total_rss_mb']:>15.1f} {row['largest_rss_mb']:>12.1f}"
        )
    r = report["pss_mb"]
    print(
        f"total PSS after warm-up (round {warm}): {r['after_warmup_first']} -> {r['after_warmup_last']} MB "
        f"(growth {r['growth_after_warmup']} MB; slope over the second half {r['slope_per_100_rounds_second_half']} "
        f"MB/100 rounds; short runs make it noise); range after warm-up {r['after_warmup_min']}-"
        f"{r['after_warmup_max']} MB; peak {r['peak_total']} MB PSS ({r['peak_total_rss']} MB RSS)"
    )
    print(f"failures: rounds with missing replies {short or 'none'}, rounds without update {not_updated or 'none'}")
    print(f"final epsilon: {report['final_epsilon']}")
    print(f"samples and details: {args.json}")
    sys.exit(0 if status == "completed" else 1)


if __name__ == "__main__":
    main()
