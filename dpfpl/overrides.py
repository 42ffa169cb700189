"""Run-config overrides from the command line: a named preset (``--preset``) under ``-c key=value`` pairs,
applied over the run config's defaults and checked before anything starts.

A module of its own because every command that runs a federation reads them (``cli``, ``run_commands``,
``audit.command``), and a light one: ``dpfpl --help`` imports it, so it loads no backbone and no torch.
"""

from __future__ import annotations

import argparse
import tomllib

from pydantic import ValidationError

from .common.config import RunConfig
from .common.data.images import DatasetError
from .common.secfpp.protocol import check_run_config
from .presets import preset_overrides

PRESET_HELP = "a named run-config preset (`dpfpl presets` lists them), applied under -c overrides"
RUN_CONFIG_HELP = "key=value (TOML value)"


def add_run_config_options(
    parser: argparse.ArgumentParser, preset_help: str = PRESET_HELP, run_config_help: str = RUN_CONFIG_HELP
) -> None:
    """``--preset NAME`` and ``-c/--run-config key=value`` (repeatable): the options every run command shares."""
    parser.add_argument("--preset", help=preset_help)
    parser.add_argument("-c", "--run-config", action="append", default=[], help=run_config_help)


def parse_overrides(pairs: list[str]) -> dict:
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


def requested_overrides(args: argparse.Namespace) -> dict:
    """What a command's ``--preset`` and ``-c`` ask for; a ``-c`` pair wins over the preset's value."""
    return {**preset_overrides(args.preset), **parse_overrides(args.run_config)}


def full_run_config(overrides: dict) -> dict:
    """The run config's defaults with ``overrides`` applied, as Flower builds a run's config."""
    return {**RunConfig.defaults(), **overrides}


def checked_config(overrides: dict, *, builds_federation: bool = True) -> RunConfig:
    """The run config a command would use, validated before anything starts (a bad key, value or data set
    ends the command with the reason, not a traceback). ``builds_federation``: the command starts its own
    nodes, so it needs their number (``dpfpl submit`` runs on the federation the SuperLink has)."""
    try:
        cfg = RunConfig.from_flower(full_run_config(overrides))
        check_run_config(cfg)  # SecFPP's decoding and cluster-size checks: before any features are encoded
    except ValidationError as err:
        problems = [
            f"  {'-'.join(str(x) for x in e['loc']).replace('_', '-') or 'run config'}: "
            f"{e['msg'].removeprefix('Value error, ')}"
            for e in err.errors()
        ]
        raise SystemExit("dpfpl: invalid run config:\n" + "\n".join(problems)) from None
    except DatasetError as err:
        raise SystemExit(f"dpfpl: {err}") from None
    except ValueError as err:
        raise SystemExit(f"dpfpl: invalid run config:\n  run config: {err}") from None
    if (
        builds_federation and cfg.num_clients == 0
    ):  # "as many as the federation has" means nothing where dpfpl builds the federation
        raise SystemExit(
            "dpfpl: invalid run config:\n  num-clients: 0 leaves the number to the federation (plain `flwr run .`); "
            "this command builds its own federation: give the number of clients, e.g. -c num-clients=10"
        )
    return cfg
