"""Which library modules a workflow script runs: its diffprune imports, followed transitively.

Snakemake only notices a change to a rule's script; a change to a library module it imports must
be an input too, or Snakemake and DVC (whose stages list the same modules) disagree on what is out
of date. Imports are read from the source (AST), anywhere in a file, lazy ones included.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

PACKAGE = "diffprune"


def _module_file(root: Path, name: str) -> Path | None:
    """The file of a dotted diffprune module name, or None for anything else."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = root.joinpath(*parts)
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(path: Path, root: Path) -> frozenset[Path]:
    """The diffprune module files `path` imports directly (package __init__ included)."""
    return _parsed_imports(path, root, path.stat().st_mtime_ns)


@cache
def _parsed_imports(path: Path, root: Path, mtime_ns: int) -> frozenset[Path]:
    """Parsed once per file version: Snakemake asks for every rule's modules at each parse."""
    del mtime_ns  # part of the cache key only
    found = set()
    for node in _statements(ast.parse(path.read_text(), filename=str(path)).body):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from diffprune import paths` imports the module diffprune.paths
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == PACKAGE:
                found.add(root / PACKAGE / "__init__.py")
            if (module := _module_file(root, name)) is not None:
                found.add(module)
                if module.name == "__init__.py" and module.parent != root / PACKAGE:
                    # a subpackage may load its modules lazily (diffprune.data does), which an
                    # AST cannot follow: importing it counts as importing all of its modules
                    found.update(module.parent.glob("*.py"))
    return frozenset(found)


def _statements(nodes: list[ast.AST]) -> Iterator[ast.stmt]:
    """Every statement in `nodes`, nested ones included (function, class, if, try, with, match
    bodies): imports are statements, so expressions, nine in ten nodes, are never walked."""
    for node in nodes:
        if isinstance(node, ast.stmt):
            yield node
        # an except handler or a match case is not a statement, but holds a body of them
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            yield from _statements(getattr(node, field, []))


def library_modules(script: str | Path, root: str | Path = ".") -> list[str]:
    """Every diffprune module file `script` imports, transitively, relative to `root`, sorted."""
    root = Path(root).resolve()
    seen: set[Path] = set()
    todo = [(root / script).resolve()]
    while todo:
        for module in _imports(todo.pop(), root) - seen:
            seen.add(module)
            todo.append(module)
    return sorted(str(path.relative_to(root)) for path in seen)


def script_path(rule: Any) -> str:
    """A Snakemake rule's script, relative to the working directory (a rule names it relative to
    its .smk file)."""
    folder = rule.basedir.get_path_or_uri(secret_free=True)
    return os.path.relpath(os.path.join(folder, rule.script))
