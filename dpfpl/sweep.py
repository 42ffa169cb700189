"""Experiment sweeps: methods x epsilons x seeds (x ranks), run one after another, tabulated as in the papers.

A sweep is a list of ordinary runs, each in its own run directory ``OUT/runs/<method>_eps-<e>_rank-<k>_seed-<s>``
with the usual checkpoint, metrics and summary, plus ``sweep-run.json`` (which cell of the grid it is).
Everything the report needs is in those directories, so ``report(OUT)`` can rebuild ``results.csv``,
``table.md`` and the plots after an interrupted sweep, and re-running a sweep only runs what is missing:
a run with a summary is skipped, a run with only a checkpoint continues after its last checkpointed round.

Runs go seed-major (every method and epsilon for seed 0, then seed 1, ...), so an interrupted sweep already
has a complete table over fewer seeds. One failing run is logged (``run.log`` and ``error.txt`` in its
directory) and reported; the sweep goes on.

The default runtime is in-process (``dpfpl.inprocess``): the same ServerApp and ClientApp code without the
SuperLink start-up and per-message transport, which on 2 CPU cores cost more than the rounds of a small run.
``runtime="flower"`` runs each run through a real Flower simulation instead.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import traceback
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .common.atomic import write_bytes, write_json
from .common.config import RunConfig
from .common.features import demo_features
from .common.models import cached_clip
from .common.outcome import OUTCOME_FILE, RunOutcome
from .common.secfpp.protocol import check_run_config
from .inprocess import run_inprocess
from .launch import run_simulation
from .overrides import full_run_config
from .sweep_grid import (  # noqa: F401 (the grid's names, for the sweep's users)
    ACCURACY_KEYS,
    ACCURACY_TITLES,
    ERROR_FILE,
    NO_DP,
    RUN_LABEL,
    SWEEP_KEYS,
    SweepRun,
    SweepSpec,
    expand,
    run_dir_of,
)
from .sweep_report import report

log = logging.getLogger("dpfpl.sweep")

# ---------------------------------------------------------------------------------------------------- running


def is_done(run_dir: Path, rounds: int) -> bool:
    """Finished: a summary of at least the planned number of rounds (a sweep re-run with more rounds
    continues the runs instead of skipping them)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return False
    try:
        summary = json.loads(path.read_text())
        # a run none of whose rounds updated the global prompt has no result: not done (it fails again)
        no_result = summary.get("rounds-run", 0) > 0 and summary.get("rounds-updated") == 0
        return int(summary.get("rounds", 0)) >= rounds and not no_result
    except (ValueError, OSError):
        return False


@contextmanager
def _run_log(run_dir: Path) -> Iterator[None]:
    """The project's log lines of one run go to ``run_dir/run.log`` instead of the console, where the
    sweep's progress bar lives."""
    logger = logging.getLogger("dpfpl")
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    except Exception:
        logger.exception("the run failed")
        raise
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _prepare(configs: list[dict], node_config: dict) -> None:
    """Build the demo backbone and image features once, before the progress bar starts (the
    first node would otherwise do it inside the first run, under the sweep's progress bar)."""
    seen = set()
    for config in configs:
        cfg = RunConfig.from_flower(config)
        key = (cfg.model_name, cfg.pretrained)
        if cfg.dataset != "demo" or key in seen:
            continue
        seen.add(key)
        cache = node_config.get("cache-dir")
        demo_features(cached_clip(cfg.model_name, cfg.pretrained, cache), cache, progress=True)


def run_one(spec: SweepSpec, run: SweepRun, run_dir: Path) -> None:
    """Run (or continue) one run of the sweep in ``run_dir``."""
    overrides = run.overrides(spec, run_dir)
    config = full_run_config(overrides)
    cfg = RunConfig.from_flower(config)
    num_nodes = spec.num_nodes or cfg.num_clients
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / RUN_LABEL, {**run.label(), "run-config": overrides})
    (run_dir / ERROR_FILE).unlink(missing_ok=True)
    (run_dir / OUTCOME_FILE).unlink(missing_ok=True)  # the outcome read afterwards is this run's
    with _run_log(run_dir):
        if spec.runtime == "inprocess":
            run_inprocess(overrides, num_nodes, spec.node_config)
        else:
            run_simulation(config, num_nodes, run_dir / "flower", timeout=7 * 24 * 3600, stream=False)
    if not (run_dir / "summary.json").is_file():
        raise RuntimeError(f"the run finished without writing {run_dir / 'summary.json'}")


@dataclass
class SweepOutcome:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)
    # runs that completed, but with rounds that did not update the global prompt: the warning, per run
    warnings: dict[str, str] = field(default_factory=dict)


def run_sweep(spec: SweepSpec, progress: bool = True) -> SweepOutcome:
    """Run every missing run of ``spec`` (see the module docstring), then write the report."""
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sweep.json", spec.model_dump())
    runs = expand(spec)
    configs = {run.name: full_run_config(run.overrides(spec, run_dir_of(out, run))) for run in runs}
    rounds = {}
    for run in runs:  # every run's config is checked before the first one starts
        try:
            cfg = RunConfig.from_flower(configs[run.name])
            check_run_config(cfg)
            planned = cfg.num_server_rounds
        except ValueError as err:
            raise ValueError(f"run {run.name}: invalid run config: {err}") from err
        rounds[run.name] = 0 if run.method == "zeroshot" else planned  # zero-shot trains no round
    todo = [run for run in runs if not is_done(run_dir_of(out, run), rounds[run.name])]
    if todo:
        _prepare([configs[run.name] for run in todo], spec.node_config)

    outcome = SweepOutcome(skipped=[run.name for run in runs if run not in todo])
    bar = tqdm(
        total=len(runs),
        initial=len(outcome.skipped),
        desc="sweep",
        unit="run",
        disable=not progress,
        dynamic_ncols=True,
    )

    def finished(run: SweepRun, error: str | None) -> None:
        bar.update(1)
        if error is None:
            outcome.ran.append(run.name)
            result = RunOutcome.read(run_dir_of(out, run))
            if result is not None and result.failed_rounds:
                outcome.warnings[run.name] = result.paragraph()
                bar.write(f"run {run.name}: {result.paragraph()}") if progress else log.warning(
                    "%s", result.paragraph()
                )
            return
        # one failed run must not end a sweep of a hundred
        outcome.failed[run.name] = error.strip().splitlines()[-1]
        run_dir = run_dir_of(out, run)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_bytes(run_dir / ERROR_FILE, error.encode())
        message = (
            f"run {run.name} FAILED: {outcome.failed[run.name]} (details in {run_dir / ERROR_FILE}); the sweep goes on"
        )
        bar.write(message) if progress else log.error("%s", message)

    if spec.workers == 1:
        for run in todo:
            bar.set_postfix_str(run.name)
            finished(run, _run_guarded(spec, run, run_dir_of(out, run)))
    else:
        threads = max(1, (os.cpu_count() or 1) // spec.workers)
        with ProcessPoolExecutor(
            spec.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init, initargs=(threads,)
        ) as pool:
            futures = {pool.submit(_run_guarded, spec, run, run_dir_of(out, run)): run for run in todo}
            for future in as_completed(futures):
                bar.set_postfix_str(futures[future].name)
                finished(futures[future], future.result())
    bar.close()
    outcome.outputs = report(out)
    return outcome


def _worker_init(threads: int) -> None:
    """A sweep worker process: its share of the cores (the runs of a sweep are independent)."""
    torch.set_num_threads(threads)


def _run_guarded(spec: SweepSpec, run: SweepRun, run_dir: Path) -> str | None:
    """``run_one``, with any failure returned as its traceback text (it may cross a process boundary)."""
    try:
        run_one(spec, run, run_dir)
        return None
    except Exception:  # noqa: BLE001 - reported per run, the sweep goes on
        return traceback.format_exc()
