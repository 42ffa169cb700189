"""The report of a sweep: ``results.csv``, ``table.md`` in the papers' layout and the two plots, rebuilt
from the run directories alone (so it also works on an interrupted sweep).

Each run's number is the mean over clients of its personalized-prompt accuracy, averaged over the
evaluations of its last ``eval-last`` rounds (the papers' "mean of the last 10 rounds"); a cell is the mean
± sample standard deviation of that number over seeds, in percent.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .common.atomic import write_bytes
from .common.config import METHOD_NAMES
from .common.evaluation import last_rounds_per_client, worst_client
from .common.metrics import read_metrics_log
from .sweep_grid import (
    ACCURACY_KEYS,
    ACCURACY_TITLES,
    ERROR_FILE,
    NO_DP,
    RUN_LABEL,
    SweepSpec,
    expand,
)


@dataclass
class RunRecord:
    """What a run directory holds, as the report sees it."""

    name: str
    method: str
    epsilon: float | None
    rank: int | None
    seed: int
    summary: dict | None
    metrics: list[dict]
    error: str | None

    @property
    def column(self) -> tuple[str, int | None]:
        return self.method, self.rank

    @property
    def epsilon_label(self) -> str:
        return NO_DP if self.epsilon is None else f"{self.epsilon:g}"


def load_record(run_dir: Path) -> RunRecord | None:
    label_path = run_dir / RUN_LABEL
    if not label_path.is_file():
        return None
    label = json.loads(label_path.read_text())
    summary_path, error_path = run_dir / "summary.json", run_dir / ERROR_FILE
    eps = label["epsilon"]
    return RunRecord(
        name=label["name"],
        method=label["method"],
        epsilon=None if eps == NO_DP else float(eps),
        rank=label.get("rank"),
        seed=int(label["seed"]),
        summary=json.loads(summary_path.read_text()) if summary_path.is_file() else None,
        metrics=read_metrics_log(run_dir / "metrics.jsonl"),  # a torn last line (a kill) is dropped
        error=error_path.read_text().strip().splitlines()[-1] if error_path.is_file() else None,
    )


def load_records(out: Path, spec: SweepSpec | None) -> tuple[list[RunRecord], list[str]]:
    """The runs of the sweep (those of ``spec`` when given, else every run directory under ``OUT/runs``),
    and the names of the spec's runs that have no directory yet."""
    runs_dir = Path(out) / "runs"
    if spec is not None:
        names = [run.name for run in expand(spec)]
    else:
        names = sorted(p.name for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
    records, never_started = [], []
    for name in names:
        record = load_record(runs_dir / name)
        if record is None:
            never_started.append(name)
        else:
            records.append(record)
    return records, never_started


def load_spec(out: Path) -> SweepSpec | None:
    path = Path(out) / "sweep.json"
    return SweepSpec.model_validate_json(path.read_text()) if path.is_file() else None


def _epsilon_labels(spec: SweepSpec) -> list[str]:
    return [e if e == NO_DP else f"{e:g}" for e in spec.epsilons]


def _epsilon_sort_key(label: str) -> tuple[int, float]:
    """'none' first, then decreasing epsilon (the papers' row order)."""
    return (0, 0.0) if label == NO_DP else (1, -float(label))


def _columns(records: list[RunRecord], spec: SweepSpec | None) -> list[tuple[str, int | None]]:
    present = {r.column for r in records}
    method_order = list(spec.methods) if spec else list(METHOD_NAMES)
    rank_order = list(spec.ranks) if spec else []

    def order(c: tuple[str, int | None]) -> tuple:
        return (
            method_order.index(c[0]) if c[0] in method_order else len(method_order),
            c[0],
            rank_order.index(c[1]) if c[1] in rank_order else len(rank_order),
            c[1] or 0,
        )

    return sorted(present, key=order)


def _column_title(column: tuple[str, int | None], columns: list[tuple[str, int | None]]) -> str:
    method, rank = column
    several_ranks = len({c[1] for c in columns if c[1] is not None}) > 1
    return f"{method} (r={rank})" if several_ranks and rank is not None else method


def run_value(record: RunRecord, key: str) -> float | None:
    """A run's number for one accuracy: its published prompt's (what a user takes away: the mean of the last
    iterates); the zero-shot method's is its zero-shot accuracy. A summary without one (written before the
    published prompt was evaluated) falls back to the mean over the last evaluated rounds."""
    s = record.summary
    if s is None:
        return None
    if record.method == "zeroshot":
        return s.get("zeroshot", {}).get(key)
    value = (s.get("published") or {}).get(key)
    return value if value is not None else last_rounds_value(record, key)


def last_rounds_value(record: RunRecord, key: str) -> float | None:
    """The diagnostic: the mean of the last rounds' iterates' accuracies (the papers' number)."""
    s = record.summary
    if s is None:
        return None
    if record.method == "zeroshot":
        return s.get("zeroshot", {}).get(key)
    value = s.get("last-rounds-mean", {}).get(key)
    return value if value is not None else s.get("final", {}).get(key)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); no std for a single value."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def format_cell(values: list[float], expected: int, bold: bool = False) -> str:
    """'mean ± std' in percent (two decimals), with the seed count when seeds are missing."""
    if not values:
        return "–"
    mean, std = mean_std(values)
    text = f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")
    if bold:
        text = f"**{text}**"
    if len(values) < expected:
        text += f" ({len(values)}/{expected} seeds)"
    return text


def zeroshot_value(record: RunRecord, key: str) -> float | None:
    """A run's zero-shot accuracy (round 0, the hand-crafted prompt)."""
    return None if record.summary is None else record.summary.get("zeroshot", {}).get(key)


def _per_seed(records: list[RunRecord], value_of: Callable[[RunRecord, str], float | None], key: str) -> list[float]:
    """One value per seed (runs of the same seed averaged), in seed order."""
    by_seed: dict[int, list[float]] = {}
    for r in records:
        value = value_of(r, key)
        if value is not None:
            by_seed.setdefault(r.seed, []).append(value)
    return [statistics.fmean(v) for _, v in sorted(by_seed.items())]


def _bold_row(cells: list[list[float]]) -> list[bool]:
    """Best mean of the row in bold (ties at the printed precision all bold), when at least two compete."""
    means = [round(100 * statistics.fmean(v), 2) if v else None for v in cells]
    present = [m for m in means if m is not None]
    if len(present) < 2:
        return [False] * len(cells)
    return [m == max(present) for m in means]


def _grid_rows(
    records: list[RunRecord],
    columns: list[tuple[str, int | None]],
    epsilons: list[str],
    value_of: Callable[[RunRecord, str], float | None],
    key: str,
    cell: Callable[[list[float], bool], str],
    bold_best: bool,
) -> list[str]:
    """Markdown rows, one per epsilon: each method's per-seed values of ``value_of``, formatted by ``cell``."""
    done = [r for r in records if r.summary is not None]
    lines = []
    for eps in epsilons:
        cells = []
        for column in columns:
            runs = [r for r in done if r.column == column and (r.method == "zeroshot" or r.epsilon_label == eps)]
            cells.append(_per_seed(runs, value_of, key))
        bold = _bold_row(cells) if bold_best else [False] * len(cells)
        label = "none (no DP)" if eps == NO_DP else eps
        lines.append(f"| {label} | " + " | ".join(cell(v, b) for v, b in zip(cells, bold)) + " |")
    return lines


def _table_head(columns: list[tuple[str, int | None]]) -> list[str]:
    titles = [_column_title(c, columns) for c in columns]
    return ["| ε | " + " | ".join(titles) + " |", "|---|" + "---:|" * len(columns)]


def accuracy_table(
    records: list[RunRecord],
    key: str,
    columns: list[tuple[str, int | None]],
    epsilons: list[str],
    expected_seeds: int,
    value_of: Callable[[RunRecord, str], float | None] = run_value,
) -> str:
    """One markdown table: rows = epsilon, columns = methods, plus the zero-shot row."""
    done = [r for r in records if r.summary is not None]
    lines = _table_head(columns) + _grid_rows(
        records, columns, epsilons, value_of, key, lambda v, b: format_cell(v, expected_seeds, b), bold_best=True
    )
    zeroshot = [
        format_cell(_per_seed([r for r in done if r.column == c], zeroshot_value, key), expected_seeds) for c in columns
    ]
    lines.append("| zero-shot | " + " | ".join(zeroshot) + " |")
    return "\n".join(lines)


def worst_client_gain(record: RunRecord, key: str) -> float | None:
    """The smallest gain of any client over its own zero-shot accuracy, each client measured as the table
    measures the run (its published prompt; the mean over the last rounds' evaluations where there is none)."""
    if record.method == "zeroshot" or record.summary is None:
        return None
    zeroshot = next((m.get("per-client", {}) for m in record.metrics if m.get("phase") == "zeroshot"), {})
    published = record.summary.get("published-per-client")
    if record.summary.get("published") and published:
        return worst_client(zeroshot, published, key).get("gain")
    evals = [m for m in record.metrics if m.get("phase") == "train" and "per-client" in m]
    window = (record.summary.get("last-rounds-mean") or {}).get("rounds")
    count = window[1] - window[0] + 1 if window else 1
    return worst_client(zeroshot, last_rounds_per_client(evals, count, (key,)), key).get("gain")


def published_epsilon(record: RunRecord, key: str) -> float | None:
    """The epsilon of the published prompt p_G + p_L, worst client, as the run's accountant reported it."""
    return ((record.summary or {}).get("privacy") or {}).get("epsilon-published-max")


def worst_client_table(records: list[RunRecord], columns: list[tuple[str, int | None]], epsilons: list[str]) -> str:
    """Per cell, over seeds: the worst client's gain over its own zero-shot accuracy (worst seed, points)."""

    def cell(values: list[float], _bold: bool) -> str:
        return f"{100 * min(values):+.1f}" if values else "–"

    trained = [c for c in columns if c[0] != "zeroshot"]
    return "\n".join(
        _table_head(trained)
        + _grid_rows(records, trained, epsilons, worst_client_gain, "local-acc", cell, bold_best=False)
    )


def epsilon_table(records: list[RunRecord], columns: list[tuple[str, int | None]], epsilons: list[str]) -> str:
    """Per cell: the published prompt's epsilon each run's accountant reported (max over seeds)."""

    def cell(values: list[float], _bold: bool) -> str:
        return f"{max(values):.3g}" if values else "–"

    trained = [c for c in columns if c[0] != "zeroshot"]
    rows = [e for e in epsilons if e != NO_DP]
    return "\n".join(
        _table_head(trained) + _grid_rows(records, trained, rows, published_epsilon, "", cell, bold_best=False)
    )


def _header(records: list[RunRecord], spec: SweepSpec | None, out: Path, seeds: list[int]) -> list[str]:
    done = [r for r in records if r.summary is not None]
    trained = [r for r in done if r.method != "zeroshot"]
    lines = [f"# Sweep results: {out}", ""]
    if spec is not None:
        if spec.command:
            lines += [f"Command: `{spec.command}`", ""]
        overrides = ", ".join(f"{k}={json.dumps(v)}" for k, v in spec.base.items()) or "none"
        lines += [
            (
                f"- methods {', '.join(spec.methods)}; epsilons {', '.join(_epsilon_labels(spec))}; "
                f"ranks {', '.join(map(str, spec.ranks))} (factorized methods); runtime {spec.runtime}"
            ),
            f"- run-config overrides of every run (over pyproject's defaults): {overrides}",
        ]
    rounds = sorted({r.summary.get("rounds") for r in trained})
    windows = sorted({tuple(r.summary.get("last-rounds-mean", {}).get("rounds", ())) for r in trained})
    window_text = ", ".join(f"{w[0]}–{w[1]}" for w in windows if len(w) == 2) or "?"
    any_summary = done[0].summary if done else {}
    privacy = next((r.summary.get("privacy", {}) for r in trained if r.summary.get("privacy", {}).get("dp")), {})
    lines += [
        (
            f"- seeds: {len(seeds)} ({', '.join(map(str, seeds))}); model {any_summary.get('model', '?')}, "
            f"{any_summary.get('num-clients', '?')} clients; rounds: {', '.join(map(str, rounds)) or '?'}"
        ),
        (
            "- each run's number: the mean over clients of the accuracy of the prompt the run publishes (p_G and "
            f"each p_L averaged over their last {_publish_text(trained)} iterates, post-processing: no extra ε); "
            'the zeroshot column and row: the hand-crafted prompt "a photo of a {class}." (round 0). The mean '
            f"of the last rounds' iterates (rounds {window_text}, the papers' number) is a diagnostic table below"
        ),
        "- cells: mean ± standard deviation over seeds (sample std, n − 1), in percent; best of each row in bold",
        (
            "- ε: target epsilon of each mechanism (calibrate-for: "
            f"{privacy.get('calibrate-for', '?')}; δ = {privacy.get('delta', '?')}, PLD accountant); "
            "none: DP off (no guarantee)"
        ),
        "",
    ]
    return lines


def _publish_text(trained: list[RunRecord]) -> str:
    counts = sorted({(r.summary.get("published-prompt") or {}).get("average-of-last") for r in trained} - {None})
    return ", ".join(map(str, counts)) or "?"


def _problems(records: list[RunRecord], never_started: list[str]) -> list[str]:
    failed = [r for r in records if r.summary is None and r.error]
    partial = [r for r in records if r.summary is None and not r.error]
    lines = []
    if failed or partial or never_started:
        lines += ["## Runs missing from the tables", ""]
        lines += [f"- failed: `{r.name}`: {r.error}" for r in failed]
        lines += [f"- unfinished (resumes on the next `dpfpl sweep`): `{r.name}`" for r in partial]
        lines += [f"- not started: `{name}`" for name in never_started]
        lines.append("")
    return lines


def write_table(records: list[RunRecord], never_started: list[str], spec: SweepSpec | None, out: Path) -> Path:
    seeds = list(spec.seeds) if spec else sorted({r.seed for r in records})
    columns = _columns(records, spec)
    epsilons = sorted(
        {r.epsilon_label for r in records if r.method != "zeroshot"} | (set(_epsilon_labels(spec)) if spec else set()),
        key=_epsilon_sort_key,
    )
    done = [r for r in records if r.summary is not None]
    keys = [k for k in ACCURACY_KEYS if any(run_value(r, k) is not None for r in done)] or ["local-acc", "neighbor-acc"]
    lines = _header(records, spec, out, seeds)
    for key in keys:
        lines += [f"## {ACCURACY_TITLES[key]} (%)", "", accuracy_table(records, key, columns, epsilons, len(seeds)), ""]
    if any(worst_client_gain(r, "local-acc") is not None for r in done):
        lines += [
            "## Worst client: local accuracy gain over its own zero-shot (points, worst seed)",
            "",
            worst_client_table(records, columns, epsilons),
            "",
        ]
    if any((r.summary or {}).get("published") for r in done):
        for key in keys:
            lines += [
                f"## Diagnostic: {ACCURACY_TITLES[key]} (%), mean of the last rounds' iterates",
                "",
                accuracy_table(records, key, columns, epsilons, len(seeds), last_rounds_value),
                "",
            ]
    if any(published_epsilon(r, "") is not None for r in done):
        lines += [
            "## Published prompt p_G + p_L: epsilon reported by the accountant (worst client, max over seeds)",
            "",
            epsilon_table(records, columns, epsilons),
            "",
        ]
    lines += _problems(records, never_started)
    path = Path(out) / "table.md"
    write_bytes(path, "\n".join(lines).encode())
    return path


def _rows(record: RunRecord) -> list[dict]:
    """A run's logged rounds, then its published prompt's accuracies (phase ``published``, at its last round), the
    number the tables report."""
    published = (record.summary or {}).get("published") or {}
    numbers = {k: v for k, v in published.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not numbers:
        return record.metrics
    last = max((int(m.get("round", 0)) for m in record.metrics), default=0)
    return [*record.metrics, {"round": last, "phase": "published", **numbers}]


def write_results_csv(records: list[RunRecord], out: Path) -> Path:
    """One row per (run, logged round), and one for its published prompt: the run's coordinates, then every metric
    key present anywhere."""
    fixed = ["method", "epsilon", "rank", "seed", "round", "phase"]
    keys: list[str] = []
    for r in records:
        for row in _rows(r):
            keys += [k for k in row if k not in fixed and k not in keys and not isinstance(row[k], (dict, list))]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fixed + keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in records:
        for row in _rows(r):
            writer.writerow(
                {
                    **row,
                    "method": r.method,
                    "epsilon": r.epsilon_label,
                    "rank": "" if r.rank is None else r.rank,
                    "seed": r.seed,
                }
            )
    path = Path(out) / "results.csv"
    write_bytes(path, buf.getvalue().encode())
    return path


def _plot_acc_vs_epsilon(records: list[RunRecord], columns, epsilons: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in records if r.summary is not None]
    floats = sorted(float(e) for e in epsilons if e != NO_DP)
    # "none" sits right of the largest epsilon on the log axis, behind a dotted separator, labelled
    x_none = floats[-1] * 4 if floats else 1.0
    xpos = {e: (x_none if e == NO_DP else float(e)) for e in epsilons}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for ax, key in zip(axes, ("local-acc", "neighbor-acc")):
        for column in columns:
            if column[0] == "zeroshot":
                continue
            points = {}
            for eps in epsilons:
                values = _per_seed([r for r in done if r.column == column and r.epsilon_label == eps], run_value, key)
                if values:
                    mean, std = mean_std(values)
                    points[eps] = (100 * mean, 100 * (std or 0.0))
            if not points:
                continue
            # the DP points form the curve; the no-DP point gets the same colour but is not joined to it
            curve = [e for e in epsilons if e in points and (e != NO_DP or not floats)]
            color = None
            if curve:
                bars = ax.errorbar(
                    [xpos[e] for e in curve],
                    [points[e][0] for e in curve],
                    yerr=[points[e][1] for e in curve],
                    marker="o",
                    capsize=3,
                    label=_column_title(column, columns),
                )
                color = bars.lines[0].get_color()
            if floats and NO_DP in points:
                ax.errorbar(
                    [x_none],
                    [points[NO_DP][0]],
                    yerr=[points[NO_DP][1]],
                    marker="s",
                    capsize=3,
                    linestyle="none",
                    color=color,
                    label=None if curve else _column_title(column, columns),
                )
        zeroshot = _per_seed(done, zeroshot_value, key)
        if zeroshot:
            ax.axhline(100 * statistics.fmean(zeroshot), color="grey", linestyle="--", label="zero-shot")
        if floats:
            ax.set_xscale("log")
            ax.axvline((floats[-1] * x_none) ** 0.5, color="lightgrey", linestyle=":")
        ax.set_xticks([xpos[e] for e in epsilons])
        ax.set_xticklabels(["none\n(no DP)" if e == NO_DP else e for e in epsilons])
        ax.minorticks_off()
        ax.set(
            xlabel="target ε per mechanism (log scale)",
            ylabel="accuracy (%)",
            title=f"{ACCURACY_TITLES[key].lower()} (mean ± std over seeds)",
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_acc_vs_round(records: list[RunRecord], columns, epsilons: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(epsilons))
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.8 * nrows), squeeze=False, sharey=True)
    zeroshot = [r for r in records if r.method == "zeroshot" and r.summary is not None]
    for ax, eps in zip(axes.flat, epsilons):
        for column in columns:
            if column[0] == "zeroshot":
                continue
            runs = [r for r in records if r.column == column and r.epsilon_label == eps]
            by_round: dict[int, list[float]] = {}
            for r in runs:
                for row in r.metrics:
                    if "local-acc" in row:
                        by_round.setdefault(int(row["round"]), []).append(row["local-acc"])
            if by_round:
                xs = sorted(by_round)
                ax.plot(
                    xs,
                    [100 * statistics.fmean(by_round[x]) for x in xs],
                    marker=".",
                    label=_column_title(column, columns),
                )
        values = _per_seed(zeroshot, zeroshot_value, "local-acc")
        if values:
            ax.axhline(100 * statistics.fmean(values), color="grey", linestyle="--", label="zeroshot")
        ax.set(title=f"ε = {eps}" if eps != NO_DP else "no DP", xlabel="round (0: zero-shot)")
        if ax in axes[:, 0]:
            ax.set_ylabel("local accuracy (%), mean over seeds")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(out: Path) -> dict[str, Path]:
    """Rebuild results.csv, table.md and the two plots of a sweep from its run directories (and sweep.json,
    when present, for the grid's order and the runs still missing)."""
    out = Path(out)
    spec = load_spec(out)
    records, never_started = load_records(out, spec)
    columns = _columns(records, spec)
    epsilons = sorted({r.epsilon_label for r in records if r.method != "zeroshot"}, key=_epsilon_sort_key)
    outputs = {"results": write_results_csv(records, out), "table": write_table(records, never_started, spec, out)}
    outputs["acc_vs_epsilon"] = out / "acc_vs_epsilon.png"
    _plot_acc_vs_epsilon(records, columns, epsilons, outputs["acc_vs_epsilon"])
    outputs["acc_vs_round"] = out / "acc_vs_round.png"
    _plot_acc_vs_round(records, columns, epsilons or [NO_DP], outputs["acc_vs_round"])
    return outputs
