"""Run a workflow script (workflow/scripts/*.py) in-process with a fake `snakemake` object.

Snakemake's `script:` directive runs the file with a `snakemake` global whose `input`, `output`,
`params`, `wildcards` and `log` are namedlists: lists whose items can also be named, read as
attributes, by `["name"]` or with `.get(name, default)`; a named list of files (`store=[a, b, c]`)
is flattened into the positional list and its name gives the sub-list. `NamedList` mimics that
much, which is all the scripts use; tests/test_scripts.py checks it against Snakemake's own class.
"""

from __future__ import annotations

import contextlib
import logging
import os
import runpy
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from threadpoolctl import threadpool_limits

from diffprune import checkpoints

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "workflow" / "scripts"


class NamedList(list):
    """A list with named items (or named slices): attribute, index and `.get` access."""

    def __init__(self, *items: Any, **named: Any):
        super().__init__(items)
        self._names: dict[str, Any] = {}
        for name, value in named.items():
            if name in ("get", "items", "keys"):
                raise AttributeError(f"{name} is reserved, as in Snakemake")
            if isinstance(value, list | tuple):
                start = len(self)
                self.extend(value)
                self._names[name] = NamedList(*self[start:])
            else:
                self.append(value)
                self._names[name] = value
            # an instance attribute, as Snakemake sets it: it shadows list methods (`index`)
            setattr(self, name, self._names[name])

    def __getitem__(self, key):
        if isinstance(key, str):
            return self._names[key]
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        return self._names.get(key, default)

    def items(self):
        return self._names.items()

    def keys(self):
        return self._names.keys()


def files(*items: Any, **named: Any) -> NamedList:
    """A NamedList of paths as strings, as Snakemake passes them to scripts."""

    def text(value):
        return [str(v) for v in value] if isinstance(value, list | tuple) else str(value)

    return NamedList(*(text(i) for i in items), **{k: text(v) for k, v in named.items()})


def fake_snakemake(
    *,
    input: NamedList,
    output: NamedList,
    params: dict[str, Any] | None = None,
    wildcards: dict[str, str] | None = None,
    log: str | os.PathLike,
    threads: int = 1,
) -> SimpleNamespace:
    return SimpleNamespace(
        input=input,
        output=output,
        params=NamedList(**(params or {})),
        wildcards=NamedList(**{k: str(v) for k, v in (wildcards or {}).items()}),
        log=files(log),
        threads=threads,
    )


def run_script(name: str, snakemake: SimpleNamespace) -> dict[str, Any]:
    """Run workflow/scripts/<name>.py with `snakemake` injected; return the script's globals.

    The scripts' `diffprune.logs.setup` replaces the root logger's handlers (with a file handler)
    and sets thread counts; both are put back afterwards so that later tests see no difference.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    threads = torch.get_num_threads()
    try:
        return runpy.run_path(str(SCRIPTS / f"{name}.py"), init_globals={"snakemake": snakemake})
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
        torch.set_num_threads(threads)
        threadpool_limits(1)


HOLD_LOCK = textwrap.dedent(
    """
    import fcntl, os, sys
    with open(sys.argv[1], "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.exit("busy")
        f.seek(0); f.truncate(); f.write(f"{os.getpid()}\\n"); f.flush()
        print("locked", flush=True)
        sys.stdin.read()
    """
)


@contextlib.contextmanager
def locked_elsewhere(directory: Path) -> Iterator[int]:
    """Hold `directory`'s run lock in another process (flock on its lock file, as
    checkpoints.run_lock takes it), as a job still training would; yields that process's pid."""
    directory.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(directory / checkpoints.LOCK)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)


def wait_for(condition, *, timeout: float, what: str) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
