"""``dpfpl audit``: one audit per claimed epsilon, printed, written as JSON and plotted against the ceiling.

Why a command of its own: an audit is a run plus canaries plus a statistical test; a user who changes the
mechanism (a new method, a new noise path) reruns it and reads one line per threat model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from ..overrides import add_run_config_options, checked_config

if TYPE_CHECKING:
    from .run import AuditResult


def add_parser(sub) -> None:
    p = sub.add_parser("audit", help="empirical epsilon lower bound of a run (one-run canary audit), beside its claim")
    add_run_config_options(p)
    p.add_argument("--canaries", type=int, default=1000, help="m, the number of canaries (default 1000)")
    p.add_argument("--confidence", type=float, default=0.95, help="of the lower bound (default 0.95)")
    p.add_argument("--epsilons", default=None, help="comma-separated target epsilons: one audit each (a sweep)")
    p.add_argument("--seed", type=int, default=0, help="the canaries' and the audit noise's seed")
    p.add_argument("--json", dest="json_out", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="lower bound against claimed epsilon, next to the ceiling (PNG)")
    p.add_argument("--cache-dir", default=None, help="the backbone and feature cache (default: the usual one)")


def plot(results: list[AuditResult], out: Path) -> Path:
    """Each threat model's lower bound against the claimed epsilon, the ceiling for m, and the diagonal."""
    import matplotlib  # lazy: only --plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    claimed = [r.epsilon_claimed for r in results]
    fig, ax = plt.subplots(figsize=(5, 4))
    top = max(claimed)
    ax.plot([0, top], [0, top], "k:", label="claimed (accountant)")
    ax.plot(claimed, [r.ceiling for r in results], "k--", label=f"ceiling, m = {results[0].canaries}")
    for i, name in enumerate(r.threat_model for r in results[0].results):
        ax.plot(claimed, [r.results[i].epsilon_lower_bound for r in results], "o-", label=name)
    ax.set_xlabel("claimed epsilon")
    ax.set_ylabel(f"epsilon lower bound ({results[0].confidence:.0%})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(args, overrides: dict) -> int:
    from .run import VIOLATION, AuditSettings, run_audit  # lazy: torch; cli imports this module for add_parser

    targets = [float(e) for e in args.epsilons.split(",")] if args.epsilons else [None]
    settings = AuditSettings(canaries=args.canaries, confidence=args.confidence, seed=args.seed)
    results = []
    for target in targets:
        config = {**overrides, **({} if target is None else {"target-epsilon": target})}
        cfg = checked_config(config)  # a bad key or value ends the command with the reason, as for simulate
        label = f"audit at target epsilon {cfg.target_epsilon:g}"
        with tqdm(total=cfg.num_server_rounds, desc=label, unit="round", file=sys.stderr) as bar:
            result = run_audit(cfg, settings, args.cache_dir, progress=lambda _: bar.update(1))
        print("\n".join(result.lines()))
        results.append(result)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([r.model_dump(by_alias=True) for r in results], indent=2) + "\n")
        print(f"results: {args.json_out}")
    if args.plot:
        print(f"plot: {plot(results, Path(args.plot))}")
    if any(r.violation for r in results):
        print(VIOLATION, file=sys.stderr)
        return 1
    return 0
