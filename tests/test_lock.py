"""The committed dvc.lock (and so results/) must come from the committed code and params.

`dvc status` compares every stage's recorded dependency hashes with the tree. Data that is not
here (a fresh clone has no `data/`) shows up as deleted and is fine; a changed code file or
params section means the committed results were made by other code, and someone has to rerun
what depends on it and commit the new results with the new lock.
"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DVC = Path(sys.executable).parent / "dvc"
TRACKED = ("diffprune/", "workflow/", "params.yaml", "Snakefile")


def stale_dependencies(status: dict) -> list[str]:
    """Code and params dependencies that `dvc status --json` reports as changed."""
    stale = []
    for stage, entries in status.items():
        for entry in entries:
            if not isinstance(entry, dict):  # e.g. "changed checksum": the stage itself changed
                stale.append(f"{stage}: {entry}")
                continue
            for path, state in entry.get("changed deps", {}).items():
                if isinstance(state, dict):  # params: {"params.yaml": {"train": "modified"}}
                    stale += [f"{stage}: {path}:{key} {how}" for key, how in state.items()]
                elif path.startswith(TRACKED):
                    stale.append(f"{stage}: {path} {state}")
    return stale


def test_stale_dependencies_are_found():
    status = {
        "train@x": [{"changed deps": {"diffprune/train.py": "modified", "data/a.npy": "deleted"}}],
        "report": [{"changed deps": {"params.yaml": {"report": "modified"}}}],
        "embed": [{"changed outs": {"data/embed/embeddings.npy": "not in cache"}}],
    }
    assert stale_dependencies(status) == [
        "train@x: diffprune/train.py modified",
        "report: params.yaml:report modified",
    ]


def test_dvc_lock_matches_the_code_and_params():
    out = subprocess.run(
        [str(DVC), "status", "--json"], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert stale_dependencies(json.loads(out.stdout or "{}")) == []
