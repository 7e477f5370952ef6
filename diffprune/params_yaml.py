"""Read params YAML as data, and nothing more.

Snakemake renders a config file with YTE templating when its top level says `__use_yte__: true`:
a value such as `?__import__("os").system(...)` then runs while the config is read. PyYAML takes
the last of two equal keys without a word (DVC refuses them), and aliases can expand a few
hundred bytes into gigabytes (`a: &a [1, 1]`, `b: &b [*a, *a]`, ...). So params files are read
with a loader that refuses templating keys, a key written twice and any alias, with the line,
before anything expands or runs:

- `params.yaml` by the Snakefile before its `configfile:` line, and by `load_params`;
- `--configfile` overlays by the workflow profile (profiles/default/config.yaml), which Snakemake
  reads before it loads the overlays (it does so while parsing its command line, before the
  Snakefile), and again by the Snakefile.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from diffprune.errors import ConfigError

# YTE's keys; keys starting with `?` are its conditionals and loops (?if, ?elif, ?else, ?for).
TEMPLATE_KEYS = frozenset({"__use_yte__", "__definitions__", "__variables__"})
ALLOWED = "allowed: plain YAML mappings, lists and values"


class _Refused(yaml.YAMLError):
    """A params file uses YAML that data does not need; `line` is 1-based."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line, self.message = line, message


class _ParamsLoader(yaml.SafeLoader):
    """SafeLoader without aliases, repeated keys or templating keys."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):  # refused before anything is expanded
            event = self.peek_event()
            raise _Refused(
                event.start_mark.line + 1,
                f"alias *{event.anchor}: YAML aliases are refused in params (a few of them can "
                f"expand into gigabytes); write the value out; {ALLOWED}",
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in TEMPLATE_KEYS or (isinstance(key, str) and key.startswith("?")):
                raise _Refused(
                    line,
                    f"key {key!r} is templating (Snakemake's YTE would run code in this file); "
                    f"params are data; {ALLOWED}",
                )
            if key in seen:
                raise _Refused(
                    line,
                    f"key {key!r} is written twice (first at line {seen[key]}); Snakemake would "
                    "take the last and DVC refuses the file; allowed: each key once per mapping",
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read(path: str | os.PathLike) -> Any:
    """The parsed params file; ConfigError with one line naming file, line and problem."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such params file")
    try:
        return yaml.load(path.read_text(), Loader=_ParamsLoader)  # a SafeLoader
    except _Refused as err:
        raise ConfigError(f"{path} line {err.line}: {err.message}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: {_yaml_problem(err)}") from None


def check_files(paths: Iterable[str | os.PathLike]) -> None:
    """Read each params file that exists with the strict loader (Snakemake reads it next)."""
    for path in paths:
        if Path(path).exists():
            read(path)


def refuse_unsafe_overlays(argv: list[str] | None = None) -> bool:
    """Check the `--configfile` overlays of a Snakemake command line, parsed by Snakemake's own
    parser; on a problem print one line and exit 1. Returns True so that the workflow profile
    can use it as an option's value (YTE runs it before Snakemake reads the overlays)."""
    from snakemake.cli import get_argument_parser

    args, _ = get_argument_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        check_files(args.configfile or ())
    except ConfigError as err:
        print(f"diffprune: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    return True


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: where the YAML breaks (1-based line and column) and why."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"not valid YAML{where}: {' '.join(problem.split())}"
