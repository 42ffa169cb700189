"""The installed package, not the checkout: every command must work from any directory (a user runs ``dpfpl``
from their own project folder, where the repository's folders are not on ``sys.path``), and the distribution
claims one top-level import name, ``dpfpl``."""

from __future__ import annotations

import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds a wheel and a fresh environment

ROOT = Path(__file__).resolve().parent.parent
ENV = {"PATH": "/usr/bin:/bin", "FLWR_TELEMETRY_ENABLED": "0"}


@pytest.mark.parametrize("command", [["bench", "--help"], ["presets"], ["partition", "--help"], ["worker", "--help"]])
def test_commands_import_from_the_install_outside_the_checkout(tmp_path, command):
    result = subprocess.run(
        [sys.executable, "-m", "dpfpl.cli", *command],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**ENV, "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
        cwd=out,
    )
    return next(out.glob("dpfpl-*.whl"))


def test_the_wheel_installs_one_top_level_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"dpfpl"}
    for module in (
        "dpfpl/common/config.py",
        "dpfpl/server_app/app.py",
        "dpfpl/client_app/app.py",
        "dpfpl/cli.py",
        "dpfpl/bench/step.py",
        "dpfpl/common/model_configs/dpfpl-demo-tiny.json",
    ):
        assert module in names


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory, wheel) -> Path:
    """A new virtual environment outside the checkout with the wheel installed: the dependencies are this
    environment's (a .pth line, which does not run this environment's own .pth files, so no editable finder),
    Flower's programs are rewritten onto the new interpreter."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (purelib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    with zipfile.ZipFile(wheel) as whl:
        whl.extractall(purelib)
    bindir = Path(sysconfig.get_paths()["scripts"])
    for program in (
        "flwr",
        "flower-superlink",
        "flower-supernode",
        "flower-superexec",
        "flwr-serverapp",
        "flwr-clientapp",
        "flwr-simulation",
    ):
        if (bindir / program).is_file():
            text = (bindir / program).read_text().split("\n", 1)[1]
            (venv / "bin" / program).write_text(f"#!{python}\n{text}")
            (venv / "bin" / program).chmod(0o755)
    (venv / "bin" / "dpfpl").write_text(f"#!{python}\nimport sys\nfrom dpfpl.cli import main\nsys.exit(main())\n")
    (venv / "bin" / "dpfpl").chmod(0o755)
    return venv


def _run(venv: Path, args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**ENV, "PATH": f"{venv / 'bin'}:{ENV['PATH']}", "HOME": str(cwd), "DPFPL_CACHE": str(cwd / "cache")}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_a_fresh_venv_has_only_dpfpl_and_its_model_configs(fresh_venv, tmp_path):
    code = (
        "import importlib.util, importlib.resources as r, dpfpl.common.models as m, dpfpl.server_app.app, "
        "dpfpl.client_app.app, dpfpl.cli\n"
        "assert all(importlib.util.find_spec(n) is None for n in ('common', 'server_app', 'client_app', 'bench'))\n"
        "assert r.files('dpfpl.common').joinpath('model_configs', 'dpfpl-demo-tiny.json').is_file()\n"
        "print(m.__file__)"
    )
    result = _run(fresh_venv, [str(fresh_venv / "bin" / "python"), "-c", code], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(fresh_venv) in result.stdout and str(ROOT) not in result.stdout
    assert _run(fresh_venv, ["dpfpl", "presets"], tmp_path).returncode == 0


@pytest.mark.flower
def test_a_fresh_venv_runs_a_simulation_through_flwr_run(fresh_venv, tmp_path):
    """``dpfpl simulate`` submits the installed app with ``flwr run`` to a real SuperLink (simulation engine)."""
    overrides = [
        "num-clients=2",
        "min-clients=2",
        "num-server-rounds=1",
        "eval-every=1",
        "eval-last=0",
        "pretrained=none",
        "n-ctx=4",
        "batch-size=8",
        "rank=2",
        "target-epsilon=0",
        "noise-multiplier-local=1.0",
        "noise-multiplier-global=1.0",
    ]
    args = ["dpfpl", "simulate", "--run-dir", str(tmp_path / "run"), "--quiet"]
    result = _run(fresh_venv, [*args, *sum((["-c", o] for o in overrides), [])], tmp_path, timeout=900)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert (tmp_path / "run" / "summary.json").is_file()
