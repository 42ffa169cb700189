"""The user's commands.

dpfpl demo                 build the demo backbone (once), run DP-FPL with 10 simulated clients on the
                           embedded default, print zero-shot vs final accuracy and the privacy report
dpfpl simulate -c k=v ...  the same engine with any run-config override (keys of [tool.flwr.app.config])
dpfpl prepare              only build/cache the backbone and the data set's image features
dpfpl partition -c k=v     print the data set and each simulated client's classes and counts
dpfpl presets              list the papers' settings (use with --preset NAME)
dpfpl report RUN_DIR       print the table of a finished run
dpfpl export RUN_DIR --node I --out prompt.safetensors
                           publish node I's personalized prompt with its manifest (model, classes, epsilon)
dpfpl predict prompt.safetensors IMAGES_OR_FOLDERS -k 3
                           classify images with a published prompt and the OpenCLIP model it names
dpfpl attack --methods dpfpl,coop --epsilons none,8,1,0.1 --out runs/attack
                           membership inference against published prompts, per epsilon (table + plot)
dpfpl audit --epsilons 1,2,4,8 --canaries 1000 --json audit.json --plot audit.png
                           an empirical epsilon lower bound beside the accountant's (one-run canary audit)
dpfpl sweep --methods dpfpl,promptfl --epsilons none,0.4,0.1 --seeds 0,1,2 --ranks 8 --out runs/sweep
                           run every combination (resumable) and write results.csv, table.md and plots
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import signal
import sys
import time
import tomllib
from pathlib import Path

from . import prompt_commands
from .audit import command as audit_command
from .common.config import RunConfig
from .common.outcome import OUTCOME_FILE, RunFailed, RunOutcome
from .launch import run_simulation
from .presets import describe_presets, preset_overrides


def _parse_overrides(pairs: list[str]) -> dict:
    """``key=value`` pairs, values as TOML (``rank=4``, ``dp=false``); a bare word is a string
    (``method=fedpgp`` is ``method="fedpgp"``), as ``flwr run --run-config`` users would expect."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if not _:
            raise SystemExit(f"override '{pair}' is not key=value")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"] if value.strip() else ""
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value.strip()
    return out


def prepare(cfg: RunConfig, print_partition: bool = True) -> None:
    """Load the backbone, check the data set and encode its images once (shared by every simulated node
    through the feature cache), and print the partition the nodes will compute."""
    import torch

    from .common.models import load_clip

    model = load_clip(cfg.model_name, cfg.pretrained)
    if torch.cuda.is_available():  # encoding a real data set is image-tower work: use the GPU when there is one
        model.model.to("cuda")
    if cfg.dataset == "silo":
        return  # each node reads and checks its own silo
    from .common.features import augmented_train_features, dataset_features
    from .common.node import run_dataset, run_partition

    data = run_dataset(cfg)
    if print_partition:
        print(data.summary())
        print(run_partition(cfg).summary())
    dataset_features(model, data, progress=True)
    if cfg.augment_views:
        augmented_train_features(model, data, cfg.augment_views, cfg.seed, progress=True)


def show_partition(cfg: RunConfig) -> None:
    """``dpfpl partition``: the data set and each client's classes and counts, without training."""
    from .common.node import run_dataset, run_partition

    print(run_dataset(cfg).summary())
    print(run_partition(cfg).summary())


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "inf" if math.isinf(x) else f"{x:.4f}"
    return str(x)


REPORT_COLUMNS = {
    "local-acc": "local",
    "neighbor-acc": "neighbor",
    "base-acc": "base",
    "novel-acc": "novel",
    "hm-of-means": "HM",
}


def reference_dir(run_dir: Path) -> Path:
    """Where ``dpfpl demo`` runs its non-private reference: the same recipe with dp = false."""
    return Path(f"{run_dir}-no-dp")


def report(run_dir: Path) -> str:
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    reference_path = reference_dir(run_dir) / "summary.json"
    reference = json.loads(reference_path.read_text()) if summary["privacy"]["dp"] and reference_path.is_file() else {}
    zs, fin, priv = summary["zeroshot"], summary["final"], summary["privacy"]
    pub = summary.get("published") or fin
    last = summary.get("last-rounds-mean") or {}
    protocol = summary.get("evaluation-protocol") or {"name": "pathological", "description": "pathological"}
    # the columns this protocol reports (demo/pathological: local + neighbor; base-novel: + base, novel, HM)
    columns = [k for k in REPORT_COLUMNS if any(k in row for row in (zs, pub, last))] or ["local-acc", "neighbor-acc"]

    def row(title: str, values: dict) -> str:
        return f"{title:<40}" + "".join(f"{_fmt(values.get(k)):>10}" for k in columns)

    note = summary.get("published-prompt") or {}
    rounds = note.get("rounds")
    published_title = (
        f"published prompt (mean of rounds {rounds[0]}-{rounds[1]})"
        if rounds and rounds[0] != rounds[1]
        else "published prompt (final round)"
    )
    lines = [
        f"method {summary['method']} | model {summary['model']} | {summary['num-clients']} clients | "
        f"{summary['rounds']} rounds",
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
    lines.append("")
    if priv["dp"]:
        lines += [
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
    else:
        lines.append("privacy: DP disabled (no guarantee)")
    return "\n".join(lines)


def plot(run_dir: Path) -> Path:
    """Accuracy and epsilon over rounds, next to the metrics they come from."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .common.metrics import read_metrics_log

    rows = read_metrics_log(Path(run_dir) / "metrics.jsonl")
    fig, (ax_acc, ax_eps) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in REPORT_COLUMNS.items():
        pts = [(r["round"], r[key]) for r in rows if key in r]
        if pts:
            ax_acc.plot(*zip(*pts), marker="o", label=label)
    ax_acc.set(xlabel="round", ylabel="accuracy (mean over clients)", title="personalized prompt (round 0: zero-shot)")
    ax_acc.legend()
    for key, label in (
        ("epsilon-local-max", "LDP mechanism alone"),
        ("epsilon-global-max", "global prompt p_G"),
        ("epsilon-published-max", "published p_G + p_L"),
    ):
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


def _checked_config(overrides: dict) -> RunConfig:
    """The run config a command would use, validated before anything starts (a bad key, value or data set
    ends the command with the reason, not a traceback)."""
    from pydantic import ValidationError

    from .common.data.images import DatasetError

    try:
        return RunConfig.from_flower({**RunConfig.defaults(), **overrides})
    except ValidationError as err:
        problems = [
            f"  {'-'.join(str(x) for x in e['loc']).replace('_', '-') or 'run config'}: "
            f"{e['msg'].removeprefix('Value error, ')}"
            for e in err.errors()
        ]
        raise SystemExit("dpfpl: invalid run config:\n" + "\n".join(problems)) from None
    except DatasetError as err:
        raise SystemExit(f"dpfpl: {err}") from None


def simulate(
    overrides: dict, run_dir: Path, num_supernodes: int | None, stream: bool, gpus_per_client: float | None = None
) -> Path:
    import torch

    config = {**RunConfig.defaults(), **overrides, "run-dir": str(run_dir.resolve())}
    cfg = _checked_config({**overrides, "run-dir": str(run_dir.resolve())})  # fail fast on a bad key or value
    prepare(cfg)
    if gpus_per_client is None:  # share the visible GPUs among at most 4 concurrent clients; none: CPU
        gpus_per_client = (
            min(1.0, torch.cuda.device_count() / min(4, cfg.num_clients)) if torch.cuda.is_available() else 0.0
        )
    started = time.time()
    try:
        run_simulation(
            config, num_supernodes or cfg.num_clients, run_dir, stream=stream, num_gpus_per_client=gpus_per_client
        )
    except RunFailed as err:
        raise _explained(err, run_dir, started) from err
    return run_dir


def _fresh_outcome(run_dir: Path, since: float) -> RunOutcome | None:
    """The outcome the ServerApp wrote for this launch (not one left by an earlier run in the directory)."""
    path = Path(run_dir) / OUTCOME_FILE
    if not path.is_file() or path.stat().st_mtime < since - 1:
        return None
    return RunOutcome.read(run_dir)


def _explained(err: RunFailed, run_dir: Path, since: float) -> RunFailed:
    """A failed run, explained by what its ServerApp wrote (the setup summary, or the table of a run in which
    no round updated the global prompt) when the run directory is readable from here."""
    outcome = _fresh_outcome(run_dir, since)
    if outcome is None or outcome.status == "completed":
        return err
    if outcome.status == "no-round-updated" and (Path(run_dir) / "summary.json").is_file():
        print(report(run_dir))
    return RunFailed(outcome.paragraph())


def _warn_failed_rounds(run_dir: Path, since: float) -> None:
    """Last words of a run in which some rounds left the global prompt untouched: count them."""
    outcome = _fresh_outcome(run_dir, since)
    if outcome is not None and outcome.failed_rounds:
        print(f"\ndpfpl {outcome.paragraph()}", file=sys.stderr)


# The demo preset: the recipe of docs/results/README.md (how it was chosen, on a validation split, is there).
# The prompt starts as the hand-written "a photo of a" (p_G), the local part near zero; both clipping norms
# match the per-sample gradients' scale at that start; each node bounds its accumulated local noise
# (local-noise-radius); the noise is calibrated for the published prompt p_G + p_L. 50 rounds (not the paper's
# 100) keep the demo, pretraining included, within minutes on 2 CPU cores.
DEMO_PRESET = {
    "n-ctx": 4,
    "ctx-init": "a photo of a",
    "local-init-std": 0.0002,
    "rank": 2,
    "max-grad-norm-local": 1.0,
    "max-grad-norm-global": 1.0,
    "calibrate-for": "published",
    "target-epsilon": 1.0,
    "lr-global": 0.1,
    "lr-local": 0.1,
    "local-noise-radius": 0.3,
    "global-noise-radius": 0.6,
    "num-server-rounds": 50,
    "eval-every": 5,
    "resume": False,
}


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def sweep(args: argparse.Namespace, argv: list[str]) -> int:
    """``dpfpl sweep``: run the grid (or only rebuild its report); exit status 1 when a run failed."""
    from .sweep import NO_DP, SweepSpec, run_sweep
    from .sweep_report import report

    out = Path(args.out)
    if args.report_only:
        outputs = report(out)
        print("\n".join(f"{name}: {path}" for name, path in outputs.items()))
        return 0
    from .sweep import SWEEP_KEYS

    preset = preset_overrides(args.preset) if args.preset else DEMO_PRESET
    # the grid's own axes (method, epsilon, rank, seed, ...) come from the sweep, not from the preset
    base = {
        **{k: v for k, v in preset.items() if k not in SWEEP_KEYS},
        "resume": True,
        **_parse_overrides(args.run_config),
    }
    try:
        spec = SweepSpec(
            methods=_split(args.methods),
            seeds=[int(s) for s in _split(args.seeds)],
            epsilons=[NO_DP if e.lower() == NO_DP else float(e) for e in _split(args.epsilons)],
            ranks=[int(r) for r in _split(args.ranks)],
            base=base,
            out=str(out),
            runtime=args.runtime,
            workers=args.workers,
            command=" ".join(["dpfpl", *(shlex.quote(a) for a in argv)]),
        )
        print("sweep base overrides:", ", ".join(f"{k}={v}" for k, v in base.items()))
        outcome = run_sweep(spec)
    except ValueError as err:  # a bad list or run config: say so before any run starts
        raise SystemExit(f"dpfpl sweep: {err}") from None
    print(f"\n{len(outcome.ran)} runs done now, {len(outcome.skipped)} already done, {len(outcome.failed)} failed")
    for name, reason in outcome.failed.items():
        print(f"  FAILED {name}: {reason}")
    for name, warning in outcome.warnings.items():
        print(f"  {name}: {warning}", file=sys.stderr)
    print("\n".join(f"{name}: {path}" for name, path in outcome.outputs.items()))
    return 1 if outcome.failed else 0


def _terminate_cleanly(signum, frame):  # SIGTERM -> exception, so launch's finally-blocks stop what it started
    raise KeyboardInterrupt(f"signal {signum}")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message tells the user what to fix (a weights file, a data root, a silo, a run that could
    not succeed): the message is the whole story, a traceback would only bury it."""
    from .common.classlist import ClassListMismatch
    from .common.data.images import DatasetError
    from .common.models import WeightsMismatchError, WeightsUnavailableError
    from .publish import PromptMismatchError, PublishedPromptError

    return (
        DatasetError,
        WeightsUnavailableError,
        WeightsMismatchError,
        ClassListMismatch,
        PublishedPromptError,
        PromptMismatchError,
        RunFailed,
    )


def one_paragraph(text: str) -> str:
    """A message as one paragraph: its lines kept, blank lines (which would split it) dropped."""
    return "\n".join(line for line in str(text).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # anywhere on the line, like a global option
    argv = [a for a in argv if a != "--debug"]
    try:
        _main(argv)
    except _user_errors() as err:
        if debug:
            raise
        raise SystemExit(f"dpfpl: {one_paragraph(err)}\n(--debug shows the traceback)") from None


def _main(argv: list[str]) -> None:
    signal.signal(signal.SIGTERM, _terminate_cleanly)
    if argv[:1] == ["bench"]:  # the benchmark has its own options (python -m dpfpl.bench.step --help)
        from .bench.step import main as bench_main

        bench_main(argv[1:])
        return
    if argv[:1] == ["worker"]:  # a node's resident worker: its own options (dpfpl worker --help)
        from .client_app.worker import main as worker_main

        sys.exit(worker_main(argv[1:]))
    parser = argparse.ArgumentParser(
        prog="dpfpl",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="--debug (anywhere): show the traceback of an error",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    preset_help = "a named run-config preset (`dpfpl presets` lists them), applied under -c overrides"
    for name in ("demo", "simulate"):
        p = sub.add_parser(name)
        p.add_argument("--preset", help=preset_help)
        p.add_argument("-c", "--run-config", action="append", default=[], help="key=value (TOML value)")
        p.add_argument(
            "--run-dir",
            default=None,
            help=f"where the run writes (default: -c run-dir=..., else runs/{'demo' if name == 'demo' else 'latest'})",
        )
        p.add_argument("--quiet", action="store_true", help="do not stream the Flower logs")
        if name == "demo":
            p.add_argument(
                "--no-reference",
                action="store_true",
                help="skip the non-private reference run (the same recipe with dp = false)",
            )
        p.add_argument(
            "--gpus-per-client",
            type=float,
            default=None,
            help="GPU share of each simulated client (default: GPUs / min(4, clients) when CUDA is visible, else 0)",
        )
    p = sub.add_parser("submit", help="submit to a SuperLink connection in $FLWR_HOME/config.toml and follow it")
    p.add_argument("connection")
    p.add_argument("--preset", help=preset_help)
    p.add_argument("-c", "--run-config", action="append", default=[], help="key=value (TOML value)")
    p.add_argument("--timeout", type=float, default=24 * 3600)
    p = sub.add_parser("prepare", help="build/check the backbone and data set, encode image features (once)")
    p.add_argument("--preset", help=preset_help)
    p.add_argument("-c", "--run-config", action="append", default=[], help="key=value (TOML value)")
    p = sub.add_parser("partition", help="print the data set and each client's classes and counts")
    p.add_argument("--preset", help=preset_help)
    p.add_argument("-c", "--run-config", action="append", default=[], help="key=value (TOML value)")
    sub.add_parser("presets", help="list the named presets (the papers' settings)")
    sub.add_parser("worker", help="a deployed node's resident worker (`dpfpl worker --state-dir DIR`)")
    sub.add_parser("bench", help="benchmark of the DP-FPL step and of rounds (table + JSON; `dpfpl bench --help`)")
    p = sub.add_parser("report")
    p.add_argument("run_dir")
    p = sub.add_parser("ledger", help="a node's privacy ledger: every run's epsilon, steps and dates, and the total")
    p.add_argument("--state-dir", required=True, help="the node's state directory (node config state-dir)")
    p.add_argument("--delta", type=float, default=1e-5, help="the delta the epsilons are stated at (default 1e-5)")
    p.add_argument("--lifetime-epsilon", type=float, default=None, help="print the node's lifetime budget beside it")
    p = sub.add_parser("sweep", help="methods x epsilons x seeds (x ranks), resumable, tabulated as in the papers")
    p.add_argument("--methods", default="dpfpl", help="comma-separated, in the table's column order")
    p.add_argument("--epsilons", default="none,0.4", help="comma-separated target epsilons; 'none': DP off")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--ranks", default="8", help="ranks of the factorized methods (dpfpl, dpfpl-noresidual, fedpgp)")
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--preset", help=preset_help + " (instead of the demo preset)")
    p.add_argument(
        "-c",
        "--run-config",
        action="append",
        default=[],
        help="key=value (TOML value), applied to every run over the demo preset",
    )
    p.add_argument("--workers", type=int, default=1, help="runs at a time, each in its own process")
    p.add_argument(
        "--runtime",
        choices=("inprocess", "flower"),
        default="inprocess",
        help="inprocess (default): same apps, no SuperLink; flower: a Flower simulation per run",
    )
    p.add_argument("--report-only", action="store_true", help="only rebuild csv, table and plots from --out")
    prompt_commands.add_parsers(sub)
    audit_command.add_parser(sub, preset_help)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    if args.command in ("export", "predict", "attack"):
        getattr(prompt_commands, args.command)(args)
        return

    if args.command == "presets":
        print(describe_presets())
        return
    if args.command == "audit":
        sys.exit(audit_command.main(args, {**preset_overrides(args.preset), **_parse_overrides(args.run_config)}))
    if args.command == "submit":
        from .launch import submit_run

        overrides = {**preset_overrides(args.preset), **_parse_overrides(args.run_config)}
        cfg = _checked_config(overrides)  # fail fast
        started = time.time()
        # the run directory is the ServerApp's; where it is readable from here, the outcome is read from it
        try:
            run_id = submit_run(args.connection, overrides, timeout=args.timeout)
        except RunFailed as err:
            raise _explained(err, Path(cfg.run_dir), started) from err
        print(f"run {run_id} completed")
        if (outcome := _fresh_outcome(Path(cfg.run_dir), started)) is not None:
            print(f"global prompt updated in {outcome.rounds_updated} of {outcome.rounds_run} rounds")
        _warn_failed_rounds(Path(cfg.run_dir), started)
    elif args.command in ("prepare", "partition"):
        cfg = _checked_config({**preset_overrides(args.preset), **_parse_overrides(args.run_config)})
        prepare(cfg) if args.command == "prepare" else show_partition(cfg)
    elif args.command == "sweep":
        sys.exit(sweep(args, argv))
    elif args.command == "ledger":
        from dpfpl.common.privacy.ledger import LEDGER_FILE, PrivacyLedger

        if not (Path(args.state_dir) / LEDGER_FILE).exists():
            sys.exit(f"dpfpl: no privacy ledger in {args.state_dir} (this node has released nothing under DP)")
        print(f"privacy ledger of {args.state_dir} (dp-accounting PLD, add/remove one record, delta {args.delta:g})")
        print(PrivacyLedger.of(Path(args.state_dir)).describe(args.delta, args.lifetime_epsilon))
    elif args.command == "report":
        print(report(Path(args.run_dir)))
        print(f"curves: {plot(Path(args.run_dir))}")
    else:
        started = time.time()
        overrides = {**preset_overrides(args.preset), **_parse_overrides(args.run_config)}
        if args.preset:
            print(f"preset {args.preset}:", ", ".join(f"{k}={v}" for k, v in preset_overrides(args.preset).items()))
        if args.command == "demo":
            overrides = {**DEMO_PRESET, **overrides}
            print("demo preset:", ", ".join(f"{k}={v}" for k, v in DEMO_PRESET.items()))
        default_dir = "runs/demo" if args.command == "demo" else "runs/latest"
        if args.run_dir and "run-dir" in overrides and Path(args.run_dir) != Path(str(overrides["run-dir"])):
            sys.exit(f"dpfpl: --run-dir {args.run_dir} and -c run-dir={overrides['run-dir']} disagree; give one")
        run_dir = Path(args.run_dir or overrides.get("run-dir") or default_dir)
        run_dir = simulate(overrides, run_dir, None, stream=not args.quiet, gpus_per_client=args.gpus_per_client)
        if args.command == "demo" and not args.no_reference and overrides.get("dp", True):
            print("\nthe same recipe without DP (the reference that shows what privacy costs):")
            simulate(
                {**overrides, "dp": False},
                reference_dir(run_dir),
                None,
                stream=False,
                gpus_per_client=args.gpus_per_client,
            )
        print()
        print(report(run_dir))
        print(f"curves: {plot(run_dir)}")
        print(f"\nwall time {time.time() - started:.0f} s; run directory {run_dir.resolve()}")
        _warn_failed_rounds(run_dir, started)


if __name__ == "__main__":
    main(sys.argv[1:])
