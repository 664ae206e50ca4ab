"""The import graph of the project packages: no import cycles, no private names used across modules.

Cycles are found on grimp's graph (the engine of import-linter). It records every import statement, those inside
functions included: an import moved into a function hides a cycle from Python's start-up order, not from the
design. Imports under ``if TYPE_CHECKING:`` are left out (``exclude_type_checking_imports``): they never run, so
they cannot take part in a runtime cycle.

Package ``__init__`` modules: grimp records only explicit imports. Python also initialises ``pkg/__init__.py``
before any ``pkg.mod``, but that implicit parent import is not an edge, so a package that re-exports its submodules
is not a cycle. A submodule that explicitly imports its package (``from pkg import name``) while ``pkg/__init__``
imports that submodule is one (it works only if ``name`` is bound before the import line) and is reported.
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
import textwrap
from collections.abc import Iterable
from pathlib import Path

import grimp
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "models", "training")


def build_graph(*packages: str) -> grimp.ImportGraph:
    # cache_dir=None: grimp would otherwise write a .grimp_cache folder into the working directory.
    return grimp.build_graph(*packages, exclude_type_checking_imports=True, cache_dir=None)


def find_cycles(graph: grimp.ImportGraph) -> list[tuple[str, ...]]:
    """One shortest cycle through each direct import that has a way back, e.g. ``("a", "b", "a")``.

    A cycle is listed once, however many of its imports it is found from (rotations are the same cycle).
    """
    cycles: list[tuple[str, ...]] = []
    seen: set[frozenset[tuple[str, str]]] = set()
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            way_back = graph.find_shortest_chain(importer=imported, imported=importer)
            if way_back is None:
                continue
            cycle = (importer, *way_back)
            edges = frozenset(itertools.pairwise(cycle))
            if edges not in seen:
                seen.add(edges)
                cycles.append(cycle)
    return cycles


def describe_cycle(graph: grimp.ImportGraph, cycle: tuple[str, ...]) -> str:
    """``a -> b -> a`` followed by the import statements that make each step (module:line)."""
    lines = [" -> ".join(cycle)]
    for importer, imported in itertools.pairwise(cycle):
        for detail in graph.get_import_details(importer=importer, imported=imported):
            lines.append(f"    {importer}:{detail['line_number']}: {detail['line_contents']}")
    return "\n".join(lines)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Module name -> source file for every ``.py`` file of the packages under ``root``."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _dotted(node: ast.expr) -> list[str] | None:
    """``a.b.c`` as ``["a", "b", "c"]``; None for anything that is not a plain dotted name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


def _private_uses_in(module: str, path: Path, project: set[str], libraries: bool) -> list[tuple[int, str]]:
    """(line, ``owner._name``) for the private names of other modules that ``module`` imports or reads.

    Reads are ``mod._x``, ``mod.Class._x`` and ``getattr(mod, "_x")`` (``setattr``/``hasattr``/``delattr`` too)
    where ``mod`` (or ``Class``) is bound by an import anywhere in the file (scopes are merged: a conservative
    view). Other project modules always count; third-party modules only with ``libraries``.
    """
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    project_roots = {name.split(".")[0] for name in project}
    bound: dict[str, str] = {}  # local name -> the dotted name it was imported as
    found: list[tuple[int, str]] = []

    def home(dotted: str) -> str | None:
        """The module ``dotted`` lives in when that is a module whose privates ``module`` must not use."""
        parts = dotted.split(".")
        if parts[0] not in project_roots:
            return parts[0] if libraries else None
        # The longest prefix that is a module (``mod.Class._x`` lives in mod).
        owner = next(
            (".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in project), None
        )
        return owner if owner != module else None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:  # import a.b as m: m is a.b
                    bound[alias.asname] = alias.name
                else:  # import a.b: binds a
                    top = alias.name.split(".")[0]
                    bound[top] = top
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{base}.{alias.name}"
                if _is_private(alias.name) and home(f"{base}.{alias.name}") is not None:
                    found.append((node.lineno, f"{base}.{alias.name}"))

    def imported_name(expr: ast.expr) -> str | None:
        """The dotted name ``expr`` spells when it starts with an imported name, e.g. ``pkg.mod.Class``."""
        parts = _dotted(expr)
        if not parts or parts[0] not in bound:
            return None
        return ".".join([bound[parts[0]], *parts[1:]])

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            target, name = imported_name(node.value), node.attr
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _is_private(node.args[1].value)
        ):
            target, name = imported_name(node.args[0]), node.args[1].value
        else:
            continue
        if target is not None and home(f"{target}.{name}") is not None:
            found.append((node.lineno, f"{target}.{name}"))
    return sorted(found)


def find_private_uses(root: Path, packages: Iterable[str], *, libraries: bool = False) -> list[str]:
    """``importer:line: module._name`` for every private name a module takes from another project module (and,
    with ``libraries``, from a third-party one)."""
    modules = _module_files(root, packages)
    project = set(modules)
    return [
        f"{module}:{line}: {name}"
        for module, path in modules.items()
        for line, name in _private_uses_in(module, path, project, libraries)
    ]


def test_the_packages_are_read_from_this_checkout() -> None:
    # The venv may hold another checkout installed in development mode: check the one under test.
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.origin is not None
        assert Path(spec.origin).resolve().parent.parent == REPO_ROOT, (
            f"{package} is imported from {spec.origin}, not from {REPO_ROOT}: run with PYTHONPATH={REPO_ROOT}"
        )


def test_no_import_cycles() -> None:
    graph = build_graph(*PACKAGES)
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(describe_cycle(graph, c) for c in cycles)


def test_no_private_names_across_modules() -> None:
    uses = find_private_uses(REPO_ROOT, PACKAGES)
    assert not uses, "private names used outside their module (make them public or move them):\n" + "\n".join(
        uses
    )


def test_models_use_no_private_names_of_libraries() -> None:
    # models/ is the training/serving contract: a private pydicom, torch or PIL helper may change in any release.
    uses = find_private_uses(REPO_ROOT, ["models"], libraries=True)
    assert not uses, "models/ uses private names of libraries:\n" + "\n".join(uses)


def _write_package(root: Path, name: str, files: dict[str, str]) -> None:
    package = root / name
    package.mkdir()
    for filename, source in {"__init__.py": "", **files}.items():
        (package / filename).write_text(textwrap.dedent(source), encoding="utf-8")


def test_cycle_detector_finds_a_cycle_hidden_in_a_function(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_package(
        tmp_path,
        "cyclepkg",
        {
            "a.py": "from cyclepkg import b\n",
            "b.py": """
                def late():
                    from cyclepkg.a import b  # a function-level import still closes the cycle
                    return b
            """,
            "c.py": "import cyclepkg.a\n",  # imports into the cycle, but is not part of it
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = build_graph("cyclepkg")
    cycles = find_cycles(graph)
    assert cycles == [("cyclepkg.a", "cyclepkg.b", "cyclepkg.a")]
    assert "cyclepkg.b:3: from cyclepkg.a import b" in describe_cycle(graph, cycles[0])


def test_cycle_detector_ignores_type_checking_imports_and_package_reexports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_package(
        tmp_path,
        "acyclicpkg",
        {
            "__init__.py": "from acyclicpkg.a import A\n",  # a re-export: a.py does not import the package
            "a.py": """
                from typing import TYPE_CHECKING

                if TYPE_CHECKING:
                    from acyclicpkg.b import B

                class A:
                    def partner(self) -> "B": ...
            """,
            "b.py": "from acyclicpkg.a import A\n\nclass B(A): ...\n",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert find_cycles(build_graph("acyclicpkg")) == []


def test_cycle_detector_finds_a_submodule_importing_its_reexporting_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_package(
        tmp_path,
        "initpkg",
        {
            "__init__.py": "VERSION = '1'\nfrom initpkg.a import A\n",
            "a.py": "from initpkg import VERSION\n\nA = VERSION\n",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert find_cycles(build_graph("initpkg")) == [("initpkg", "initpkg.a", "initpkg")]


def test_private_use_detector(tmp_path: Path) -> None:
    _write_package(
        tmp_path,
        "privpkg",
        {
            "owner.py": "_hidden = 1\nshown = 2\n\ndef _helper(): ...\n",
            "user.py": """
                import privpkg.owner
                import privpkg.owner as alias
                from privpkg import owner
                from privpkg.owner import __doc__, _helper, shown
                from . import owner as relative
                from .owner import _hidden

                class Thing:
                    _own = 1

                    def method(self):
                        return self._own + shown + len(__doc__ or "")

                def uses():
                    import json

                    return (
                        privpkg.owner._hidden,
                        alias._hidden,
                        owner._helper(),
                        getattr(relative, "_hidden"),
                        json._default_decoder,  # not a project module
                        Thing()._own,  # an object, not a module
                    )
            """,
            "owner_self.py": "import privpkg.owner_self\n\n_x = 1\nprint(privpkg.owner_self._x)\n",
        },
    )
    project_privates = [
        "privpkg.user:5: privpkg.owner._helper",
        "privpkg.user:7: privpkg.owner._hidden",
        "privpkg.user:19: privpkg.owner._hidden",
        "privpkg.user:20: privpkg.owner._hidden",
        "privpkg.user:21: privpkg.owner._helper",
        "privpkg.user:22: privpkg.owner._hidden",
    ]
    assert find_private_uses(tmp_path, ["privpkg"]) == project_privates
    with_libraries = find_private_uses(tmp_path, ["privpkg"], libraries=True)
    assert with_libraries == sorted([*project_privates, "privpkg.user:23: json._default_decoder"], key=_line)


def _line(use: str) -> int:
    return int(use.split(":")[1])
