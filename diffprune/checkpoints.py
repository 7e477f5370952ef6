"""Resumable training checkpoints and the divergence check, shared by the training loops
(diffusion models in diffprune.train, autoencoders in diffprune.autoencoder).

A checkpoint folder holds ``latest.pt`` and, after the second save, ``previous.pt`` (the save
before it). Each is written atomically and fsynced (``diffprune.io``). A checkpoint that cannot
be read (empty, truncated, not a checkpoint) is moved aside to ``<name>.corrupt-<time>`` with a
warning, and training resumes from ``previous.pt``, or starts over: a damaged file never blocks a
rerun. A checkpoint of another run (its key differs) is ignored, with a warning naming what
differs.

A run holds an exclusive lock on ``lock`` in its checkpoint folder while it trains, so two
processes never train the same run at once (a rerun while an orphaned job still trains refuses).
Every training takes it: diffusion models (``diffprune.train``), autoencoders and surrogates.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from diffprune import io
from diffprune.errors import TrainingDiverged

log = logging.getLogger(__name__)

LATEST = "latest.pt"
PREVIOUS = "previous.pt"
LOCK = "lock"
# Checkpoint folders whose run lock this process holds: an inner run_lock of the same folder (a
# surrogate's train() inside the surrogate's own lock) enters at once.
_HELD: set[Path] = set()


class RunLocked(RuntimeError):
    """Another process is training the same run (it holds the checkpoint folder's lock)."""


def save(directory: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` (with "key" and "step") as ``latest.pt``; the former one becomes
    ``previous.pt``. ``latest.pt`` exists at every moment once written (a reader or a crash never
    finds the folder without it): the new one is written to a temporary, then the former one is
    hard-linked (or copied) to ``previous.pt``, and the new one renamed over it. A full disk
    raises `DiskFull` (path and bytes) before the rotation: both former checkpoints stay."""
    directory = Path(directory)
    latest = directory / LATEST
    with io.atomic_path(latest, nbytes=_saved_bytes(state)) as tmp:
        torch.save(state, tmp)
        if latest.exists():
            with io.atomic_path(directory / PREVIOUS) as previous:
                try:
                    previous.unlink()
                    os.link(latest, previous)
                except OSError:  # a file system without hard links
                    shutil.copyfile(latest, previous)
    log.info("checkpoint at step %d -> %s", state["step"], latest)
    return latest


def load(
    directory: str | os.PathLike, key: dict[str, Any], *, max_step: int | None = None
) -> dict[str, Any] | None:
    """The newest readable checkpoint in `directory` whose key equals `key` (and whose step is
    at most `max_step`), tensors on the CPU; None when there is none."""
    directory = Path(directory)
    for name in (LATEST, PREVIOUS):
        path = directory / name
        if not path.is_file():
            continue
        state = _read(path)
        if state is None:
            continue
        differs = sorted(k for k in key if state["key"].get(k) != key[k])
        if max_step is not None and state["step"] > max_step:
            differs.append(f"step {state['step']} > steps {max_step}")
        if differs:
            log.warning(
                "ignoring checkpoint %s: %s differ from this run; starting over", path, differs
            )
            return None
        log.info("resuming from %s at step %d", path, state["step"])
        return state
    return None


def remove(directory: str | os.PathLike) -> None:
    """Delete the run's checkpoints (once its outputs are written)."""
    for name in (LATEST, PREVIOUS):
        (Path(directory) / name).unlink(missing_ok=True)


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive lock of a run's checkpoint folder, or raise `RunLocked` at once.

    The lock is the kernel's (flock): it goes with the process, also when it is killed. A
    process that holds it already enters again (the outer holder releases it)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    held = directory.resolve()
    if held in _HELD:
        yield
        return
    path = directory / LOCK
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise RunLocked(
                f"another process (pid {holder}) is training this run ({path} is locked); "
                "stop it or wait for it, then rerun"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        _HELD.add(held)
        try:
            yield
        finally:
            _HELD.discard(held)
            f.seek(0)
            f.truncate()
            if not any((directory / name).exists() for name in (LATEST, PREVIOUS)):
                # a finished run: no checkpoint to guard, so leave no lock file or empty folder
                path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    directory.rmdir()
            fcntl.flock(f, fcntl.LOCK_UN)


def diverged(
    step: int, what: str, *, last_good: int | None, checkpoint: Path, name: str = "training"
) -> TrainingDiverged:
    """The error for a non-finite loss or weights at `step`, naming the last good checkpoint."""
    kept = (
        f"the last good checkpoint (step {last_good}) is kept at {checkpoint}"
        if last_good is not None
        else "no checkpoint was written before it"
    )
    return TrainingDiverged(
        f"{name} diverged at step {step}: {what}; {kept}", step=step, last_good_step=last_good
    )


@torch.no_grad()
def all_finite(*modules: torch.nn.Module) -> bool:
    """Whether every parameter and buffer of `modules` is finite, with one host sync."""
    tensors = [t for m in modules for t in itertools.chain(m.parameters(), m.buffers())]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _saved_bytes(state: Any) -> int:
    """About the bytes torch.save writes for `state`: its tensors' storages, plus a record of
    at most 1 KiB for each and 64 KiB for the pickle (a check before writing, not a limit)."""
    storages: dict[int, int] = {}
    pending = [state]
    while pending:
        obj = pending.pop()
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, dict):
            pending.extend(obj.values())
        elif isinstance(obj, list | tuple):
            pending.extend(obj)
    return sum(storages.values()) + 1024 * len(storages) + (64 << 10)


def _read(path: Path) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None after moving an unreadable one aside."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not (isinstance(state, dict) and isinstance(state.get("key"), dict)):
            raise ValueError("not a checkpoint (no key record)")
        if not isinstance(state.get("step"), int):
            raise ValueError("not a checkpoint (no step)")
    except Exception as err:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        if aside.exists():
            aside = aside.with_name(f"{aside.name}-{os.getpid()}")
        os.replace(path, aside)
        lines = str(err).strip().splitlines()
        reason = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
        log.warning(
            "checkpoint %s is unreadable (%s); moved it to %s and resume from an older checkpoint "
            "or from the start",
            path, reason, aside.name,
        )  # fmt: skip
        return None
    return state
