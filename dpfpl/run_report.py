"""What a run directory says once the run has ended: the table of ``dpfpl report`` (accuracy and privacy),
its curves, and, for a run that failed or left rounds without an update, the outcome its ServerApp wrote.

Read from the files the ServerApp writes (``summary.json``, ``metrics.jsonl``, the outcome file) only, so that
``dpfpl report`` is a thin command: it loads no backbone and no torch.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from .common.metrics import read_metrics_log
from .common.outcome import OUTCOME_FILE, RunFailed, RunOutcome

REPORT_COLUMNS = {
    "local-acc": "local",
    "neighbor-acc": "neighbor",
    "base-acc": "base",
    "novel-acc": "novel",
    "hm-of-means": "HM",
}
EPSILON_CURVES = (
    ("epsilon-local-max", "LDP mechanism alone"),
    ("epsilon-global-max", "global prompt p_G"),
    ("epsilon-published-max", "published p_G + p_L"),
)


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "inf" if math.isinf(x) else f"{x:.4f}"
    return str(x)


def reference_dir(run_dir: Path) -> Path:
    """Where ``dpfpl demo`` runs its non-private reference: the same recipe with dp = false."""
    return Path(f"{run_dir}-no-dp")


def report(run_dir: Path) -> str:
    """The table of a finished run: accuracy per evaluation, then what its privacy guarantee covers."""
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    reference_path = reference_dir(run_dir) / "summary.json"
    reference = json.loads(reference_path.read_text()) if summary["privacy"]["dp"] and reference_path.is_file() else {}
    lines = [
        f"method {summary['method']} | model {summary['model']} | {summary['num-clients']} clients | "
        f"{summary['rounds']} rounds",
        *_accuracy_lines(summary, reference),
        *_rounds_lines(summary),
        "",
        *_privacy_lines(summary["privacy"]),
    ]
    return "\n".join(lines)


def _accuracy_lines(summary: dict, reference: dict) -> list[str]:
    """The evaluation protocol and the accuracy table: zero-shot, the published prompt, the non-private
    reference (where ``dpfpl demo`` ran one) and the iterates the published prompt averages."""
    zs, fin = summary["zeroshot"], summary["final"]
    pub = summary.get("published") or fin
    last = summary.get("last-rounds-mean") or {}
    protocol = summary.get("evaluation-protocol") or {"name": "pathological", "description": "pathological"}
    # the columns this protocol reports (demo/pathological: local + neighbor; base-novel: + base, novel, HM)
    columns = [k for k in REPORT_COLUMNS if any(k in row for row in (zs, pub, last))] or ["local-acc", "neighbor-acc"]

    def row(title: str, values: dict) -> str:
        return f"{title:<40}" + "".join(f"{_fmt(values.get(k)):>10}" for k in columns)

    rounds = (summary.get("published-prompt") or {}).get("rounds")
    published_title = (
        f"published prompt (mean of rounds {rounds[0]}-{rounds[1]})"
        if rounds and rounds[0] != rounds[1]
        else "published prompt (final round)"
    )
    lines = [
        f"evaluation: {protocol['description']}",
        "",
        f"{'accuracy (mean over clients)':<40}" + "".join(f"{REPORT_COLUMNS[k]:>10}" for k in columns),
        row("zero-shot (a photo of a {c}.)", zs),
        row(published_title, pub),
    ]
    if reference:  # the cost of privacy: the same recipe without DP, its published prompt
        lines.append(row("same recipe without DP (reference)", reference.get("published") or reference["final"]))
    if summary.get("published"):  # diagnostics: the iterates the published prompt averages
        lines.append(row("  diagnostic: final iterate", fin))
        if last.get("evaluations"):
            lines.append(row(f"  diagnostic: mean of rounds {last['rounds'][0]}-{last['rounds'][1]}", last))
    return lines


def _rounds_lines(summary: dict) -> list[str]:
    """The worst client against its zero-shot, and the rounds that updated the global prompt."""
    lines = []
    clients = len(summary.get("published-per-client") or summary.get("final-per-client", {}))
    worst = summary.get("worst-client")
    if worst:
        lines.append(
            f"worst client, published prompt ({worst['client']}): local {_fmt(worst['local-acc'])}, its "
            f"zero-shot {_fmt(worst['zeroshot-local-acc'])} ({worst['gain'] * 100:+.1f} points); "
            f"{worst['clients-below-zeroshot']} of {clients} clients below their zero-shot"
        )
    if "rounds-updated" in summary:
        updated, run = summary["rounds-updated"], summary["rounds-run"]
        note = "" if updated == run else "  (the other rounds had fewer than min-clients valid replies)"
        lines.append(f"global prompt updated in {updated} of {run} rounds{note}")
    return lines


def _privacy_lines(priv: dict) -> list[str]:
    """What the accountant says about the run, and what its epsilons do not cover."""
    if not priv["dp"]:
        return ["privacy: DP disabled (no guarantee)"]
    lines = [
        f"privacy ({priv['accountant']}; {priv['neighbouring-relation']}; delta = {priv['delta']:g})",
        f"  target epsilon {_fmt(priv['target-epsilon'])} (calibrated for: {priv['calibrate-for']})",
        f"  epsilon, LDP mechanism alone (worst client)          {_fmt(priv['epsilon-local-max'])}",
        f"  epsilon, GDP mechanism alone (worst client)          {_fmt(priv.get('epsilon-gdp-mechanism-max'))}",
        f"  epsilon, global prompt p_G (worst client)            {_fmt(priv['epsilon-global-max'])}",
        f"  epsilon, published p_G + p_L (composed, worst)       {_fmt(priv['epsilon-published-max'])}",
        f"  global noise multiplier z_G = {_fmt(priv['noise-multiplier-global'])}",
    ]
    lines += [f"  {key}: {text}" for key, text in priv.get("epsilon-covers", {}).items()]
    if "sample-rate" in priv:
        lines.append(f"  sample rate: {priv['sample-rate']}")
    lines += [f"  NOT COVERED: {text}" for text in priv.get("excludes", [])]
    if "approximation" in priv:
        lines.append(f"  APPROXIMATION: {priv['approximation']}")
    return lines


def plot(run_dir: Path) -> Path:
    """Accuracy and epsilon over rounds, next to the metrics they come from."""
    import matplotlib  # lazy: matplotlib loads in seconds, and only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics_log(Path(run_dir) / "metrics.jsonl")
    fig, (ax_acc, ax_eps) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in REPORT_COLUMNS.items():
        pts = [(r["round"], r[key]) for r in rows if key in r]
        if pts:
            ax_acc.plot(*zip(*pts), marker="o", label=label)
    ax_acc.set(xlabel="round", ylabel="accuracy (mean over clients)", title="personalized prompt (round 0: zero-shot)")
    ax_acc.legend()
    for key, label in EPSILON_CURVES:
        pts = [(r["round"], r[key]) for r in rows if key in r]
        if pts:
            ax_eps.plot(*zip(*pts), label=label)
    ax_eps.set(xlabel="round", ylabel="epsilon (worst client)", title="privacy spent (PLD accountant)")
    ax_eps.legend()
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def fresh_outcome(run_dir: Path, since: float) -> RunOutcome | None:
    """The outcome the ServerApp wrote for this launch (not one left by an earlier run in the directory)."""
    path = Path(run_dir) / OUTCOME_FILE
    if not path.is_file() or path.stat().st_mtime < since - 1:
        return None
    return RunOutcome.read(run_dir)


def explained(err: RunFailed, run_dir: Path, since: float) -> RunFailed:
    """A failed run, explained by what its ServerApp wrote (the setup summary, or the table of a run in which
    no round updated the global prompt) when the run directory is readable from here."""
    outcome = fresh_outcome(run_dir, since)
    if outcome is None or outcome.status == "completed":
        return err
    if outcome.status == "no-round-updated" and (Path(run_dir) / "summary.json").is_file():
        print(report(run_dir))
    return RunFailed(outcome.paragraph())


def warn_failed_rounds(run_dir: Path, since: float) -> None:
    """Last words of a run in which some rounds left the global prompt untouched: count them."""
    outcome = fresh_outcome(run_dir, since)
    if outcome is not None and outcome.failed_rounds:
        print(f"\ndpfpl {outcome.paragraph()}", file=sys.stderr)
