"""Facts the repository states in more than one place, held equal: the run config's defaults (pyproject's
``[tool.flwr.app.config]`` must repeat them for ``flwr run``), the method names, and the declared dependencies."""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

from dpfpl.common.config import METHOD_NAMES, RunConfig
from dpfpl.common.methods import build_method

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# import name -> distribution, where they differ
DISTRIBUTIONS = {
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "open_clip": "open_clip_torch",
    "flwr": "flwr",
    "dp_accounting": "dp-accounting",
    "animal_mnist": "animal-mnist",
}


# The one default that differs: ``flwr run .`` runs on whatever federation Flower points at, so pyproject leaves the
# number of clients to it (0: one per SuperNode, counted by the ServerApp); dpfpl's own commands (simulate, demo,
# sweep) launch the federation themselves and size it by RunConfig's default.
FEDERATION_SIZED = {"num-clients": 0}


def test_pyproject_run_config_is_the_run_configs_defaults():
    in_pyproject = PYPROJECT["tool"]["flwr"]["app"]["config"]
    defaults = RunConfig.defaults()
    assert set(in_pyproject) == set(defaults), set(in_pyproject) ^ set(defaults)
    differ = {k: (in_pyproject[k], defaults[k]) for k in defaults if in_pyproject[k] != defaults[k]}
    assert differ == {k: (v, defaults[k]) for k, v in FEDERATION_SIZED.items()}, f"pyproject vs RunConfig: {differ}"


def test_every_method_name_has_a_method():
    assert [build_method(name).name for name in METHOD_NAMES] == list(METHOD_NAMES)


def _declared() -> set[str]:
    names = set()
    for spec in PYPROJECT["project"]["dependencies"]:
        names.add(spec.split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower().replace("_", "-"))
    return names


def _imported_top_level(folders: list[Path]) -> set[str]:
    out = set()
    for folder in folders:
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    out.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    out.add(node.module.split(".")[0])
    return out


def test_every_third_party_import_is_declared():
    own = {"dpfpl", "common", "server_app", "client_app", "bench", "tests"}
    imported = _imported_top_level(
        [ROOT / d for d in ("common", "server_app", "client_app", "dpfpl", "bench") if (ROOT / d).is_dir()]
    )
    third_party = {m for m in imported - own if m not in sys.stdlib_module_names and m != "__future__"}
    declared = _declared()
    # animal-mnist is installed without its (unused) TensorFlow dependency by scripts/setup.sh
    missing = {
        m
        for m in third_party
        if DISTRIBUTIONS.get(m, m).lower().replace("_", "-") not in declared and m != "animal_mnist"
    }
    assert not missing, f"imported but not declared in pyproject's dependencies: {sorted(missing)}"


def test_every_package_folder_is_listed_for_setuptools():
    """pyproject lists the packages by hand (three folders are mapped under dpfpl); a folder left out would be
    missing from an installed wheel although every test run from the checkout passes."""
    setuptools = PYPROJECT["tool"]["setuptools"]
    mapped = {folder: name for name, folder in setuptools["package-dir"].items()}
    found = set()
    for init in (init for top in ["dpfpl", *mapped] for init in (ROOT / top).glob("**/__init__.py")):
        folder = init.parent.relative_to(ROOT)
        top = folder.parts[0]
        if top in mapped:
            found.add(".".join([mapped[top], *folder.parts[1:]]))
        elif top == "dpfpl":
            found.add(".".join(folder.parts))
    found.add("dpfpl.common.model_configs")  # data only: the demo backbone's OpenCLIP config
    assert set(setuptools["packages"]) == found
