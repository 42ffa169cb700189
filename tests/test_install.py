"""The installed package, not the checkout: every command must work from any directory (a user runs ``dpfpl``
from their own project folder, where the repository's top-level packages are not on ``sys.path``)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("command", [["bench", "--help"], ["presets"], ["partition", "--help"]])
def test_commands_import_from_the_install_outside_the_checkout(tmp_path, command):
    result = subprocess.run([sys.executable, "-m", "dpfpl.cli", *command], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "FLWR_TELEMETRY_ENABLED": "0",
                                                         "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
