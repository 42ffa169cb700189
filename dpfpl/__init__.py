"""dpfpl: privacy-preserving personalized federated prompt learning on OpenCLIP and Flower.

One installed name. The Flower apps and their shared code are its subpackages ``dpfpl.server_app``,
``dpfpl.client_app`` and ``dpfpl.common``; the user's tools (CLI, simulation launcher, in-process runtime,
sweeps, publish/predict, attack experiments, benchmarks) are the rest of ``dpfpl``. The layers, bottom up:
common <- server_app, client_app (never each other) <- the tools.

Installed, setuptools maps the apps' folders inside this package (``package-dir`` in pyproject.toml). In the
repository, and in a Flower app bundle built from it, they stand beside this folder at the top level: a finder
then resolves the three names to those folders, so the checkout's (or the bundle's) own files are the ones
imported, with or without an install.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_TOP = Path(__file__).resolve().parent.parent
_MAPPED = ("common", "server_app", "client_app")


class _BesideFinder:
    """Finds ``dpfpl.<name>`` for the mapped names in the folder ``<name>`` beside this package."""

    @staticmethod
    def find_spec(fullname: str, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != __name__ or name not in _MAPPED:
            return None
        folder = _TOP / name
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


if (_TOP / "pyproject.toml").is_file() and all((_TOP / n / "__init__.py").is_file() for n in _MAPPED):
    if not any(isinstance(f, type) and f.__name__ == "_BesideFinder" for f in sys.meta_path):
        sys.meta_path.insert(0, _BesideFinder)
