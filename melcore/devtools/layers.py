"""The import contract: which layer each module belongs to, and the check that imports only go down.

melcore is layered so that data handling never depends on training and training never
depends on the dashboard::

    foundation -> data -> models and store -> inference -> training -> jobs
               -> evaluation -> review -> interfaces (CLI, pages, app, trainers)

A module may import modules of its own layer or of any layer below it, never above.
Imports inside functions count the same as imports at the top of a file: a lazy import
is about start-up time, not about who may depend on whom. The dashboard is layered the
same way: ``app.py`` and ``pages`` -> ``ui`` (the Streamlit helpers they share) -> melcore.
On top of the layer order:

* melcore never imports Streamlit, ``pages``, ``ui`` or ``trainers``;
* ``ui`` never imports ``pages`` (helpers never depend on the pages that use them);
* ``pages``, ``ui`` and ``app.py`` never import ``melcore.commands`` (the CLI) and, of
  ``trainers``, only :mod:`trainers.launch` (to start the background worker);
* ``trainers`` never imports ``pages`` or ``ui``.

A module that is not in :data:`LAYERS` is reported too, so a new module is placed
deliberately. Run ``python -m melcore.devtools.layers [ROOT]`` (exit status 1 on any
violation); only the standard library is used, so the check takes well under a second.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

__all__ = ["LAYERS", "Violation", "layer_of", "module_imports", "check_tree", "main"]

#: Layers from the bottom up: (layer name, melcore modules or packages in it). A package
#: entry (``"training"``, ``"meta"``: features, model, fusion, jobs) covers all of its submodules.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "foundation",
        ("errors", "settings", "safety", "formatting", "torchfile", "caches", "devtools", "checks", "version"),
    ),
    ("data", ("images", "cohort", "cohorts", "splits", "augment", "pipeline", "demo", "metrics", "audit", "classes")),
    ("models and store", ("registry", "efficientnet_lite", "models", "colour", "store", "datasets")),
    ("inference", ("predict", "explain")),
    ("training", ("train", "training", "features", "presets", "crossval", "meta", "distributed")),
    ("jobs", ("jobs", "shards")),
    ("evaluation", ("compare", "plots", "png", "browse", "runinfo")),
    ("review", ("review", "readers", "run_archive")),
    ("interfaces", ("commands", "__main__", "dashboard")),
)
_INTERFACES = len(LAYERS) - 1
_FORBIDDEN_IN_MELCORE = ("streamlit", "pages", "ui", "trainers")
_DASHBOARD = ("pages", "ui", "app")


@dataclass(frozen=True)
class Violation:
    """One import that breaks the contract: ``path:line`` imports ``target``, and why not."""

    path: str
    line: int
    target: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: imports {self.target}: {self.reason}"


def layer_of(module: str) -> int | None:
    """Index in :data:`LAYERS` of a ``melcore.*`` module name, or None when it is not placed.

    ``melcore`` itself (the package ``__init__``) is foundation.
    """
    parts = module.split(".")
    if parts[0] != "melcore":
        raise ValueError(f"{module!r} is not a melcore module")
    if len(parts) == 1:
        return 0
    for index, (_name, members) in enumerate(LAYERS):
        if parts[1] in members:
            return index
    return None


def module_imports(path: Path, package: str = "") -> Iterator[tuple[int, str]]:
    """(line, absolute module name) for every import in a file, at any depth.

    ``from a.b import c`` yields ``a.b.c`` (c may be a submodule; callers resolve it to
    the longest module that exists). Relative imports are resolved against ``package``,
    the dotted package the file belongs to (``"melcore.commands"`` for
    ``melcore/commands/jobs.py``).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".") if package else []
                parent = parent[: len(parent) - (node.level - 1)] if node.level > 1 else parent
                base = ".".join([*parent, base] if base else parent)
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}" if base else alias.name


def _module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _melcore_target(name: str, known: set[str]) -> str:
    """The longest known melcore module that ``name`` names (``melcore.x.Y`` -> ``melcore.x``)."""
    while name not in known and "." in name:
        name = name.rpartition(".")[0]
    return name


def _sources(root: Path) -> Iterator[Path]:
    for folder in ("melcore", "pages", "ui", "trainers"):
        if (root / folder).is_dir():
            yield from sorted(p for p in (root / folder).rglob("*.py") if "__pycache__" not in p.parts)
    if (root / "app.py").is_file():
        yield root / "app.py"


def check_tree(root: Path | str) -> list[Violation]:
    """Every import in ``root``'s melcore/, pages/, ui/, trainers/ and app.py that breaks the contract.

    Parameters
    ----------
    root : path
        The repository root (the folder holding ``melcore/``).

    Returns
    -------
    list of Violation
        Empty when the tree keeps the contract; also lists melcore modules missing from
        :data:`LAYERS` (line 0, target = the module itself).
    """
    root = Path(root)
    sources = list(_sources(root))
    known = {_module_name(root, p) for p in sources}
    violations: list[Violation] = []
    for path in sources:
        module = _module_name(root, path)
        rel = str(path.relative_to(root))
        top = module.split(".")[0]
        own = layer_of(module) if top == "melcore" else _INTERFACES
        if own is None:
            violations.append(
                Violation(rel, 0, module, "module has no layer: add it to LAYERS in melcore/devtools/layers.py")
            )
            continue
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for line, name in module_imports(path, package):
            first = name.split(".")[0]
            if top == "melcore" and first in _FORBIDDEN_IN_MELCORE:
                violations.append(Violation(rel, line, name, f"melcore never imports {first}"))
                continue
            if first == "trainers" and top in _DASHBOARD and not name.startswith("trainers.launch"):
                violations.append(Violation(rel, line, name, "pages start the worker through trainers.launch only"))
                continue
            if first in ("pages", "ui") and top == "trainers":
                violations.append(Violation(rel, line, name, f"trainers never import {first}"))
                continue
            if first in ("pages", "app") and top == "ui":
                violations.append(
                    Violation(
                        rel, line, name, "ui holds the helpers the pages use: it never imports the pages or app.py"
                    )
                )
                continue
            if first != "melcore":
                continue
            target = _melcore_target(name, known)
            if top in _DASHBOARD and (target == "melcore.commands" or target.startswith("melcore.commands.")):
                violations.append(
                    Violation(
                        rel,
                        line,
                        target,
                        "pages never import the CLI (melcore.commands); call the melcore function it calls",
                    )
                )
                continue
            theirs = layer_of(target)
            if theirs is not None and theirs > own:
                violations.append(
                    Violation(rel, line, target, f"layer '{LAYERS[own][0]}' may not import layer '{LAYERS[theirs][0]}'")
                )
    return list(dict.fromkeys(violations))  # `from x import a, b` is one import of x


def main(argv: Sequence[str] | None = None) -> int:
    """Print the violations under ROOT (default: the current folder); 1 if any, else 0."""
    args = list(sys.argv[1:] if argv is None else argv)
    root = Path(args[0]) if args else Path.cwd()
    if not (root / "melcore").is_dir():
        print(f"{root} holds no melcore/ folder: give the repository root", file=sys.stderr)
        return 2
    violations = check_tree(root)
    for violation in violations:
        print(violation)
    print(f"import contract: {len(violations)} violation(s)")
    return 1 if violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
