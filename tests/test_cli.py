"""The command line itself: ``dpfpl --help`` and the thin commands load neither torch nor the backbone (the
commands that train or evaluate prompts import their modules when they run)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "open_clip", "dp_accounting", "flwr", "matplotlib", "sklearn")


@pytest.mark.parametrize("command", [["--help"], ["presets"], ["sweep", "--help"], ["audit", "--help"]])
def test_help_and_the_thin_commands_load_no_torch(command):
    code = (
        "import sys\n"
        "from dpfpl.cli import main\n"
        f"try:\n    main({command!r})\nexcept SystemExit:\n    pass\n"
        f"print('loaded:', ','.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.splitlines()[-1] == "loaded: "


def test_the_sweep_defaults_are_the_run_configs():
    from dpfpl.cli import build_parser
    from dpfpl.common.config import RunConfig

    args = build_parser().parse_args(["sweep"])
    defaults = RunConfig.defaults()
    assert args.epsilons == f"none,{defaults['target-epsilon']}" and args.ranks == str(defaults["rank"])


def test_commands_that_build_their_own_federation_need_a_number_of_clients():
    """num-clients 0 leaves the number to the federation (a plain ``flwr run .``): ``dpfpl simulate`` and the
    other commands that start their own nodes refuse it with the fix; ``dpfpl submit`` accepts it."""
    from dpfpl.overrides import checked_config

    with pytest.raises(SystemExit, match="num-clients=10"):
        checked_config({"num-clients": 0})
    assert checked_config({"num-clients": 0}, builds_federation=False).num_clients == 0


def test_an_undecodable_secfpp_config_is_refused_before_anything_starts():
    from dpfpl.overrides import checked_config

    with pytest.raises(SystemExit, match="invalid run config"):
        checked_config({"method": "secfpp", "num-clients": 4, "min-clients": 4, "secfpp-privacy": 2})
