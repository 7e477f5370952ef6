"""Read a prune manifest, or refuse a damaged one and move it aside so its rule rebuilds it.

A manifest truncated or overwritten after `select` wrote it (a full disk, a copy cut short) still
has a newer mtime than the model, so Snakemake would rerun `train` on it: delete the model, then
fail in an Arrow traceback, and every rerun would do the same. Checked while planning (the
Parquet footer, cheap) and again by the train job before it reads anything, a damaged manifest
is moved aside: the plan then has no manifest and reruns its `select` rule first, and the model
is only replaced by a training on a good one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from diffprune.errors import DataError

log = logging.getLogger(__name__)

SUFFIX = ".corrupt"
REQUIRED = {"sample_id": "int64", "keep": "bool"}


def set_aside(path: Path, why: str) -> Path:
    """Move a damaged manifest to `<path>.corrupt` (replacing an older one); returns that path."""
    aside = path.with_name(path.name + SUFFIX)
    os.replace(path, aside)
    log.warning("manifest %s is damaged (%s): moved to %s; select rebuilds it", path, why, aside)
    return aside


def check_footer(path: str | os.PathLike) -> None:
    """At plan time: move aside a manifest whose Parquet footer cannot be read (nothing if none)."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        pq.read_metadata(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged footer
        set_aside(path, f"{type(e).__name__}: {e}")


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """The manifest's sample_id and keep columns; a damaged one is moved aside and refused in
    one line naming the path, so that a rerun rebuilds it by its rule."""
    path = Path(path)
    try:
        manifest = pd.read_parquet(path, columns=list(REQUIRED))
        types = {c: str(manifest[c].dtype) for c in REQUIRED}
        wrong = {c: t for c, t in types.items() if t != REQUIRED[c]}
        if wrong:
            raise ValueError(f"column types {wrong}; expected {REQUIRED}")
    except Exception as e:  # Arrow, pandas and the checks above: all mean a damaged file
        why = f"{type(e).__name__}: {' '.join(str(e).split())}"
        aside = set_aside(path, why)
        raise DataError(
            f"manifest {path} is damaged ({why}); moved to {aside}: rerun, and rule select "
            "rebuilds it"
        ) from e
    return manifest
