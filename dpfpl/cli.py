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
import logging
import signal
import sys
import time
from pathlib import Path

from .audit import command as audit_command
from .bench.step import main as bench_main
from .common.classlist import ClassListMismatch
from .common.config import RunConfig
from .common.data.images import DatasetError
from .common.outcome import RunFailed
from .launch import submit_run
from .overrides import PRESET_HELP, add_run_config_options, checked_config, requested_overrides
from .presets import describe_presets
from .run_report import explained, fresh_outcome, plot, report, warn_failed_rounds
from .sweep_grid import NO_DP

# the commands whose module loads torch and the backbone: imported only when one of them runs
RUN_COMMANDS = ("demo", "simulate", "prepare", "partition", "sweep")
PROMPT_COMMANDS = ("export", "predict", "attack")

# ------------------------------------------------------------------------------------------------ the options


def build_parser() -> argparse.ArgumentParser:
    """Every command and its options (the commands' modules are not imported to build it)."""
    parser = argparse.ArgumentParser(
        prog="dpfpl",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="--debug (anywhere): show the traceback of an error",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_commands(sub)
    _add_node_commands(sub)
    _add_sweep_command(sub)
    _add_prompt_commands(sub)
    audit_command.add_parser(sub)
    return parser


def _add_run_commands(sub) -> None:
    """demo, simulate, submit, prepare and partition: the commands that take a run config."""
    for name in ("demo", "simulate"):
        p = sub.add_parser(name)
        add_run_config_options(p)
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
    add_run_config_options(p)
    p.add_argument("--timeout", type=float, default=24 * 3600)
    p = sub.add_parser("prepare", help="build/check the backbone and data set, encode image features (once)")
    add_run_config_options(p)
    p = sub.add_parser("partition", help="print the data set and each client's classes and counts")
    add_run_config_options(p)


def _add_node_commands(sub) -> None:
    """presets, worker, bench, report and ledger: a listing, a node's programs, and what a run left."""
    sub.add_parser("presets", help="list the named presets (the papers' settings)")
    sub.add_parser("worker", help="a deployed node's resident worker (`dpfpl worker --state-dir DIR`)")
    sub.add_parser("bench", help="benchmark of the DP-FPL step and of rounds (table + JSON; `dpfpl bench --help`)")
    p = sub.add_parser("report")
    p.add_argument("run_dir")
    p = sub.add_parser("ledger", help="a node's privacy ledger: every run's epsilon, steps and dates, and the total")
    p.add_argument("--state-dir", required=True, help="the node's state directory (node config state-dir)")
    p.add_argument("--delta", type=float, default=1e-5, help="the delta the epsilons are stated at (default 1e-5)")
    p.add_argument("--lifetime-epsilon", type=float, default=None, help="print the node's lifetime budget beside it")


def _run_config_default(field: str):
    """A run-config key's default: the sweep's default axes are the run config's, not a copy of them."""
    return RunConfig.model_fields[field].default


def _add_sweep_command(sub) -> None:
    p = sub.add_parser("sweep", help="methods x epsilons x seeds (x ranks), resumable, tabulated as in the papers")
    p.add_argument("--methods", default="dpfpl", help="comma-separated, in the table's column order")
    p.add_argument(
        "--epsilons",
        default=f"{NO_DP},{_run_config_default('target_epsilon')}",
        help="comma-separated target epsilons; 'none': DP off",
    )
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument(
        "--ranks",
        default=str(_run_config_default("rank")),
        help="ranks of the factorized methods (dpfpl, dpfpl-noresidual, fedpgp)",
    )
    p.add_argument("--out", default="runs/sweep")
    add_run_config_options(
        p,
        preset_help=PRESET_HELP + " (instead of the demo preset)",
        run_config_help="key=value (TOML value), applied to every run over the demo preset",
    )
    p.add_argument("--workers", type=int, default=1, help="runs at a time, each in its own process")
    p.add_argument(
        "--runtime",
        choices=("inprocess", "flower"),
        default="inprocess",
        help="inprocess (default): same apps, no SuperLink; flower: a Flower simulation per run",
    )
    p.add_argument("--report-only", action="store_true", help="only rebuild csv, table and plots from --out")


def _add_prompt_commands(sub) -> None:
    """export, predict and attack: what a node publishes, its use, and what an attacker learns from it."""
    p = sub.add_parser("export", help="write a node's personalized prompt (safetensors + manifest with its epsilon)")
    p.add_argument("run_dir", help="the run directory (checkpoint.safetensors, config.json)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--node", type=int, help="simulated node index (its state is RUN_DIR/nodes/node-I)")
    where.add_argument("--state-dir", help="a deployed node's own state directory")
    p.add_argument("--out", required=True, help="output file, e.g. prompt.safetensors")
    p = sub.add_parser("predict", help="classify images with an exported prompt and the OpenCLIP model it names")
    p.add_argument("prompt", help="an exported prompt file (dpfpl export)")
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("-k", "--top-k", type=int, default=1)
    p.add_argument("--pretrained", help="the same weights at another path/tag than the manifest names")
    p.add_argument("--model", help="the OpenCLIP model you expect; checked against the prompt's manifest")
    p.add_argument("--classnames", help="comma-separated class list you expect; checked against the manifest")
    p.add_argument("--out", help="write the predictions to this .csv or .json file instead of printing them")
    p.add_argument("--batch-size", type=int, default=128)
    p = sub.add_parser("attack", help="membership inference (shadow-model + loss-threshold) vs epsilon")
    # an option left out takes the experiment's default (AttackSpec: methods dpfpl,coop; epsilons none,8,1,0.1)
    p.add_argument("--methods", help="comma-separated methods (the engine's)")
    p.add_argument("--epsilons", help="target epsilons of the published prompt; 'none': no DP")
    p.add_argument("--classes", help="comma-separated demo classes (default: the ten animal classes)")
    p.add_argument("--members", type=int, help="records the target trains on (as many non-members)")
    p.add_argument("--shadows", type=int, help="shadow prompts per (method, epsilon)")
    p.add_argument("--steps", type=int, help="training steps (one Poisson batch each)")
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--n-ctx", type=int)
    p.add_argument("--rank", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples of the 95%% confidence intervals")
    p.add_argument("--out", default="runs/attack")


# ----------------------------------------------------------------------------------------------- the commands


def _submit(args: argparse.Namespace) -> None:
    """``dpfpl submit``: the run on a SuperLink, followed to its end; its outcome read where readable."""
    overrides = requested_overrides(args)
    cfg = checked_config(overrides, builds_federation=False)  # fail fast
    started = time.time()
    # the run directory is the ServerApp's; where it is readable from here, the outcome is read from it
    try:
        run_id = submit_run(args.connection, overrides, timeout=args.timeout)
    except RunFailed as err:
        raise explained(err, Path(cfg.run_dir), started) from err
    print(f"run {run_id} completed")
    if (outcome := fresh_outcome(Path(cfg.run_dir), started)) is not None:
        print(f"global prompt updated in {outcome.rounds_updated} of {outcome.rounds_run} rounds")
    warn_failed_rounds(Path(cfg.run_dir), started)


def _ledger(args: argparse.Namespace) -> None:
    """``dpfpl ledger``: every run a node released under DP, and the total."""
    from .common.privacy.ledger import LEDGER_FILE, PrivacyLedger  # lazy: dp_accounting and torch

    if not (Path(args.state_dir) / LEDGER_FILE).exists():
        sys.exit(f"dpfpl: no privacy ledger in {args.state_dir} (this node has released nothing under DP)")
    print(f"privacy ledger of {args.state_dir} (dp-accounting PLD, add/remove one record, delta {args.delta:g})")
    print(PrivacyLedger.of(Path(args.state_dir)).describe(args.delta, args.lifetime_epsilon))


def _run_command(args: argparse.Namespace, argv: list[str]) -> None:
    """demo, simulate, prepare, partition and sweep: federations on this machine (``run_commands``)."""
    from . import run_commands  # lazy: torch and the backbone; --help and the thin commands do not load them

    if args.command == "sweep":
        sys.exit(run_commands.sweep(args, argv))
    if args.command in ("prepare", "partition"):
        run_commands.prepare_or_partition(args)
    else:
        run_commands.demo_or_simulate(args)


def _prompt_command(args: argparse.Namespace) -> None:
    """export, predict and attack (``prompt_commands``)."""
    from . import prompt_commands  # lazy: torch and the backbone; --help and the thin commands do not load them

    getattr(prompt_commands, args.command)(args)


def _dispatch(args: argparse.Namespace, argv: list[str]) -> None:
    if args.command in PROMPT_COMMANDS:
        _prompt_command(args)
    elif args.command in RUN_COMMANDS:
        _run_command(args, argv)
    elif args.command == "presets":
        print(describe_presets())
    elif args.command == "audit":
        sys.exit(audit_command.main(args, requested_overrides(args)))
    elif args.command == "submit":
        _submit(args)
    elif args.command == "ledger":
        _ledger(args)
    elif args.command == "report":
        print(report(Path(args.run_dir)))
        print(f"curves: {plot(Path(args.run_dir))}")


# ------------------------------------------------------------------------------------------------- the program


def _terminate_cleanly(signum, frame):  # SIGTERM -> exception, so launch's finally-blocks stop what it started
    raise KeyboardInterrupt(f"signal {signum}")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message tells the user what to fix (a weights file, a data root, a silo, a run that could
    not succeed): the message is the whole story, a traceback would only bury it."""
    from .common.models import WeightsMismatchError, WeightsUnavailableError  # lazy: torch, read on an error only
    from .publish import PromptMismatchError, PublishedPromptError  # lazy: torch, read on an error only

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
    except Exception as err:  # noqa: BLE001 - a user error becomes its message, anything else propagates
        if debug or not isinstance(err, _user_errors()):
            raise
        raise SystemExit(f"dpfpl: {one_paragraph(err)}\n(--debug shows the traceback)") from None


def _main(argv: list[str]) -> None:
    signal.signal(signal.SIGTERM, _terminate_cleanly)
    if argv[:1] == ["bench"]:  # the benchmark has its own options (python -m dpfpl.bench.step --help)
        bench_main(argv[1:])
        return
    if argv[:1] == ["worker"]:  # a node's resident worker: its own options (dpfpl worker --help)
        from .client_app.worker import main as worker_main  # lazy: flwr; only a node's worker needs it

        sys.exit(worker_main(argv[1:]))
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    _dispatch(args, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
