"""Every optional key's default, read from the one place it is written: the ``default:`` entries of
workflow/schemas/params.schema.yaml.

`config.load_params` fills a whole params file once; library entry points called with a partial
section (tests, the ``diffprune`` CLI, users' own code) fill it with `with_defaults`, so both get
the same values. No torch here: loading the config must stay cheap.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml

SCHEMA = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "params.schema.yaml"

# The DiT paper's sizes (Peebles & Xie 2023, table 1) that train.dit_size names; width = heads *
# head dimension. Here rather than in diffusion.py so that config checks patch sizes without torch.
DIT_SIZES: dict[str, dict[str, int]] = {
    "S/2": {"depth": 12, "width": 384, "heads": 6, "patch": 2},
    "B/2": {"depth": 12, "width": 768, "heads": 12, "patch": 2},
    "L/2": {"depth": 24, "width": 1024, "heads": 16, "patch": 2},
    "XL/2": {"depth": 28, "width": 1152, "heads": 16, "patch": 2},
}


@functools.cache
def schema() -> dict[str, Any]:
    """The params schema, parsed once per process."""
    return yaml.safe_load(SCHEMA.read_text())


@functools.cache
def _section_defaults(section: str) -> tuple[tuple[str, Any], ...]:
    properties = schema()["properties"][section]["properties"]
    return tuple((key, spec["default"]) for key, spec in properties.items() if "default" in spec)


def defaults(section: str) -> dict[str, Any]:
    """The defaults of params[`section`]'s keys that have one (a fresh copy each call)."""
    return copy.deepcopy(dict(_section_defaults(section)))


def with_defaults(section: str, cfg: dict[str, Any] | None) -> dict[str, Any]:
    """`cfg` (a params section, possibly partial or None) with its absent keys filled from the
    schema's defaults; keys it gives win, and keys the schema does not know are kept."""
    return {**defaults(section), **(cfg or {})}


def fill(params: dict[str, Any]) -> dict[str, Any]:
    """A validated params dict with every section's absent keys filled from the schema."""
    return {
        name: with_defaults(name, section) if isinstance(section, dict) else section
        for name, section in params.items()
    }
