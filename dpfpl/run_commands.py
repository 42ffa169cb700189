"""``dpfpl demo``, ``simulate``, ``prepare``, ``partition`` and ``sweep``: federations run on this machine.

Kept out of ``cli.py``, which imports this module only when one of these commands runs: they load torch, the
backbone and the image features; ``dpfpl --help`` and the thin commands (``presets``, ``report``, ``submit``)
do not. Each function takes the parsed arguments and prints what a user reads.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from . import sweep_report
from .common.config import RunConfig
from .common.features import augmented_train_features, dataset_features
from .common.models import load_clip
from .common.node_data import run_dataset, run_partition
from .common.outcome import RunFailed
from .launch import run_simulation
from .overrides import checked_config, full_run_config, parse_overrides, requested_overrides
from .presets import DEMO_PRESET, preset_overrides
from .run_report import explained, plot, reference_dir, report, warn_failed_rounds
from .sweep import SweepOutcome, run_sweep
from .sweep_grid import NO_DP, SWEEP_KEYS, SweepSpec

# ---------------------------------------------------------------------------------------------- one federation


def prepare(cfg: RunConfig, print_partition: bool = True) -> None:
    """Load the backbone, check the data set and encode its images once (shared by every simulated node
    through the feature cache), and print the partition the nodes will compute."""
    model = load_clip(cfg.model_name, cfg.pretrained)
    if torch.cuda.is_available():  # encoding a real data set is image-tower work: use the GPU when there is one
        model.model.to("cuda")
    if cfg.dataset == "silo":
        return  # each node reads and checks its own silo
    data = run_dataset(cfg)
    if print_partition:
        print(data.summary())
        print(run_partition(cfg).summary())
    dataset_features(model, data, progress=True)
    if cfg.augment_views:
        augmented_train_features(model, data, cfg.augment_views, cfg.seed, progress=True)


def show_partition(cfg: RunConfig) -> None:
    """``dpfpl partition``: the data set and each client's classes and counts, without training."""
    print(run_dataset(cfg).summary())
    print(run_partition(cfg).summary())


def prepare_or_partition(args: argparse.Namespace) -> None:
    """``dpfpl prepare`` / ``dpfpl partition`` on the config that ``--preset`` and ``-c`` give."""
    cfg = checked_config(requested_overrides(args))
    prepare(cfg) if args.command == "prepare" else show_partition(cfg)


def simulate(
    overrides: dict, run_dir: Path, num_supernodes: int | None, stream: bool, gpus_per_client: float | None = None
) -> Path:
    """One run in Flower's simulation engine, after its backbone and features are ready; a failed run raises
    ``RunFailed`` with what its ServerApp wrote."""
    config = {**full_run_config(overrides), "run-dir": str(run_dir.resolve())}
    cfg = checked_config({**overrides, "run-dir": str(run_dir.resolve())})  # fail fast on a bad key or value
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
        raise explained(err, run_dir, started) from err
    return run_dir


def demo_or_simulate(args: argparse.Namespace) -> None:
    """``dpfpl demo`` / ``dpfpl simulate``: the run (for the demo, over the demo preset and beside its
    non-private reference), then its table and curves."""
    started = time.time()
    overrides = _announced_overrides(args)
    run_dir = _run_dir(args, overrides)
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
    warn_failed_rounds(run_dir, started)


def _announced_overrides(args: argparse.Namespace) -> dict:
    """The run's overrides (the demo preset under the named preset under ``-c``), each preset printed."""
    overrides = requested_overrides(args)
    if args.preset:
        print(f"preset {args.preset}:", ", ".join(f"{k}={v}" for k, v in preset_overrides(args.preset).items()))
    if args.command == "demo":
        overrides = {**DEMO_PRESET, **overrides}
        print("demo preset:", ", ".join(f"{k}={v}" for k, v in DEMO_PRESET.items()))
    return overrides


def _run_dir(args: argparse.Namespace, overrides: dict) -> Path:
    """``--run-dir``, else ``-c run-dir=...``, else the command's default (the two given must agree)."""
    default_dir = "runs/demo" if args.command == "demo" else "runs/latest"
    if args.run_dir and "run-dir" in overrides and Path(args.run_dir) != Path(str(overrides["run-dir"])):
        sys.exit(f"dpfpl: --run-dir {args.run_dir} and -c run-dir={overrides['run-dir']} disagree; give one")
    return Path(args.run_dir or overrides.get("run-dir") or default_dir)


# ---------------------------------------------------------------------------------------------------- a sweep


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def sweep(args: argparse.Namespace, argv: list[str]) -> int:
    """``dpfpl sweep``: run the grid (or only rebuild its report); exit status 1 when a run failed."""
    out = Path(args.out)
    if args.report_only:
        outputs = sweep_report.report(out)
        print("\n".join(f"{name}: {path}" for name, path in outputs.items()))
        return 0
    try:
        spec = _sweep_spec(args, argv)
        print("sweep base overrides:", ", ".join(f"{k}={v}" for k, v in spec.base.items()))
        outcome = run_sweep(spec)
    except ValueError as err:  # a bad list or run config: say so before any run starts
        raise SystemExit(f"dpfpl sweep: {err}") from None
    _print_sweep_outcome(outcome)
    return 1 if outcome.failed else 0


def _sweep_spec(args: argparse.Namespace, argv: list[str]) -> SweepSpec:
    """The grid the options ask for, over the demo preset (or ``--preset``) and ``-c``."""
    preset = preset_overrides(args.preset) if args.preset else DEMO_PRESET
    # the grid's own axes (method, epsilon, rank, seed, ...) come from the sweep, not from the preset
    base = {
        **{k: v for k, v in preset.items() if k not in SWEEP_KEYS},
        "resume": True,
        **parse_overrides(args.run_config),
    }
    return SweepSpec(
        methods=_split(args.methods),
        seeds=[int(s) for s in _split(args.seeds)],
        epsilons=[NO_DP if e.lower() == NO_DP else float(e) for e in _split(args.epsilons)],
        ranks=[int(r) for r in _split(args.ranks)],
        base=base,
        out=str(Path(args.out)),
        runtime=args.runtime,
        workers=args.workers,
        command=" ".join(["dpfpl", *(shlex.quote(a) for a in argv)]),
    )


def _print_sweep_outcome(outcome: SweepOutcome) -> None:
    print(f"\n{len(outcome.ran)} runs done now, {len(outcome.skipped)} already done, {len(outcome.failed)} failed")
    for name, reason in outcome.failed.items():
        print(f"  FAILED {name}: {reason}")
    for name, warning in outcome.warnings.items():
        print(f"  {name}: {warning}", file=sys.stderr)
    print("\n".join(f"{name}: {path}" for name, path in outcome.outputs.items()))
