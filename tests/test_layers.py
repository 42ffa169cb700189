"""The layers, read from the source (every import, including those inside functions and under TYPE_CHECKING):

    common/                    code both apps use; imports no other layer
    server_app/, client_app/   the Flower apps; import common/, never each other
    dpfpl/ (the rest)          the user's tools; import anything below

and no import cycle among the modules. The installed names are ``dpfpl.common``, ``dpfpl.server_app``,
``dpfpl.client_app`` and ``dpfpl.<tool>``; the folders' bare names (``common``, ``server_app``, ...) are never
imported. ``DPFPL_LAYERS_ROOT`` points the test at another tree (e.g. an older checkout)."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(os.environ.get("DPFPL_LAYERS_ROOT") or Path(__file__).resolve().parent.parent)
APPS = ("common", "server_app", "client_app")
LAYER = {"common": 0, "server_app": 1, "client_app": 1, "tools": 2}
BARE = {"common", "server_app", "client_app", "bench"}  # top-level names this project must not claim


def _modules() -> dict[str, Path]:
    """Module name (as installed) -> file, for every source file of the three app folders and the tools."""
    out = {}
    for folder, prefix in [(ROOT / a, f"dpfpl.{a}") for a in APPS] + [
        (ROOT / "dpfpl", "dpfpl"),
        (ROOT / "bench", "dpfpl.bench"),
    ]:
        for path in sorted(folder.rglob("*.py")) if folder.is_dir() else []:
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([prefix, *parts])] = path
    return out


MODULES = _modules()


def _layer(module: str) -> str:
    part = module.split(".")[1] if module.count(".") else ""
    return part if part in APPS else "tools"


def _resolve(module: str, path: Path, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The project modules (or bare names) one import statement names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    # ``from package import submodule`` depends on the submodule; ``from module import name`` on the module
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _resolve(module, path, node):
                    top = target.split(".")[0]
                    if top in BARE:
                        edges[module].add(target)  # a bare name: reported below
                        continue
                    while target and target not in MODULES:
                        target = target.rpartition(".")[0]
                    if target and target != module:
                        edges[module].add(target)
    return edges


EDGES = _edges()


def test_the_tree_is_found():
    assert any(m.startswith("dpfpl.common.") for m in MODULES) and any(
        m.startswith("dpfpl.server_app.") for m in MODULES
    )


def test_no_bare_top_level_names():
    bare = sorted(f"{m} -> {t}" for m, ts in EDGES.items() for t in ts if t.split(".")[0] in BARE)
    assert not bare, "import the installed names (dpfpl.common, ...), not the folders':\n" + "\n".join(bare)


def test_no_upward_import():
    wrong = []
    for module, targets in EDGES.items():
        for target in targets:
            if target.split(".")[0] in BARE:
                target = f"dpfpl.{target}"
            src, dst = _layer(module), _layer(target)
            if LAYER[dst] > LAYER[src] or (LAYER[dst] == LAYER[src] == 1 and dst != src):
                wrong.append(f"{module} ({src}) imports {target} ({dst})")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), a package and its own submodules
    excepted (a package's ``__init__`` re-exporting its submodules is not a cycle of meaning)."""

    def related(a: str, b: str) -> bool:
        return a.startswith(b + ".") or b.startswith(a + ".")

    graph = {m: {t for t in ts if t in MODULES and not related(m, t)} for m, ts in EDGES.items()}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return out


def test_no_import_cycle():
    cycles = _cycles()
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("app", ["server_app", "client_app"])
def test_each_app_has_modules(app):
    assert any(_layer(m) == app for m in MODULES)
