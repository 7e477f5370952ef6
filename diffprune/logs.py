"""Logging, thread setup and orphan handling shared by the workflow's thin scripts."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# The pids the orphan watchdog of this process watches, once it is started (it starts once).
_WATCHED: list[int] = []


def setup(log_path: str | os.PathLike | None = None, *, threads: int | None = None) -> None:
    """Log INFO to stderr and to the rule's log file; pin torch to the job's thread count; stop
    the job when the workflow engine that started it is gone (`stop_when_orphaned`).

    Every workflow script calls this first, so every job (embedding, training, scoring, ...)
    stops itself when Snakemake is killed, and none keeps a rerun's outputs or locks busy.
    Under a distributed launcher (diffprune.launch) every process appends to the log file that
    the job's first process started, each line naming its process (rank)."""
    launched = "LOCAL_RANK" in os.environ
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="a" if launched else "w"))
    rank = f" rank {os.environ.get('RANK', '0')}" if launched else ""
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s{rank} %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    if threads:
        import torch
        from threadpoolctl import threadpool_limits

        # numpy's BLAS would otherwise use every core, also when jobs share the machine
        threadpool_limits(threads)
        torch.set_num_threads(threads)
    stop_when_orphaned()


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """Measure wall seconds of a block: `with stopwatch() as t: ...; t["seconds"]`."""
    timing = {"seconds": 0.0}
    start = time.perf_counter()
    try:
        yield timing
    finally:
        timing["seconds"] = time.perf_counter() - start


def stop_when_orphaned(*, interval: float = 1.0, grace: float = 30.0) -> list[int]:
    """Stop this process when the workflow engine that started it is gone; returns the pids
    watched.

    Snakemake runs a ``script:`` job as its own child process and ``accelerate launch`` puts a
    launcher in between, so a killed Snakemake (kill -9: no chance to stop its jobs) would leave
    the job running, and a rerun would train the same run beside it. A daemon thread checks
    every `interval` seconds that this process's ancestors up to the nearest Snakemake process
    (or, without one, its parent) still live; when one is gone it logs why and sends this
    process SIGTERM, which from here on raises SystemExit in the main thread (so temporaries are
    cleaned up; Snakemake starts jobs with SIGINT ignored, so KeyboardInterrupt would not do),
    and ends the process after `grace` more seconds if it is still running. Call it from the
    main thread. A second call does nothing: one watchdog per process.
    """
    if _WATCHED:
        return list(_WATCHED)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    watched = _engine_chain()
    thread = threading.Thread(
        target=_watch, args=(watched, interval, grace), name="stop-when-orphaned", daemon=True
    )
    thread.start()
    _WATCHED.extend(pid for pid, _ in watched)
    return list(_WATCHED)


def _watch(watched: list[tuple[int, str | None]], interval: float, grace: float) -> None:
    while True:
        time.sleep(interval)
        gone = [pid for pid, start in watched if not _alive(pid, start)]
        if gone:
            break
    logging.getLogger(__name__).error(
        "stopping: process %d, which started this job (pids %s up to the workflow engine), is "
        "gone",
        gone[0], [pid for pid, _ in watched],
    )  # fmt: skip
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    os._exit(1)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _engine_chain() -> list[tuple[int, str | None]]:
    """(pid, start time) of the ancestors up to the nearest Snakemake process, or of the parent
    when there is none (the start time tells a reused pid apart; None without /proc)."""
    chain = []
    pid = os.getppid()
    while pid > 1:
        stat = _stat(pid)
        if stat is None:
            break
        chain.append((pid, stat[1]))
        if _is_snakemake(_cmdline(pid)):
            return chain
        pid = stat[0]
    parent = os.getppid()
    stat = _stat(parent)
    return [(parent, None if stat is None else stat[1])]


def _alive(pid: int, start: str | None) -> bool:
    if start is None:  # no /proc: the parent is gone when this process was re-parented
        return os.getppid() == pid
    stat = _stat(pid)
    return stat is not None and stat[1] == start and stat[2] != "Z"


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, start time, state) of a process from /proc, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name, in parentheses, may hold spaces
    return int(fields[1]), fields[19], fields[0]


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")


def _is_snakemake(argv: list[str]) -> bool:
    """`snakemake ...`, `python .../bin/snakemake ...` or `python -m snakemake ...` (not a job's
    script, which Snakemake keeps under .snakemake/scripts/)."""
    return any(Path(arg).name == "snakemake" for arg in argv[:3])
