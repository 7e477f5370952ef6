"""A resumable training run: its run key, seeded step draws, lock, rotated checkpoints, resume
and divergence checks, shared by every training loop (diffusion models and surrogates in
diffprune.train, autoencoders in diffprune.autoencoder_train) through `Run`, so each gets them
the same way.

Every random draw of a step comes from a CPU generator seeded by the run's seed and the step
(`step_generator`): a step depends on nothing else, so resuming is exact without saving sampler
state. A checkpoint carries the run's key (`run_key`: a hash of the config without the keys that
cannot change the weights, plus what else the run depends on); a new call resumes only from a
checkpoint with the same key.

A checkpoint folder holds ``latest.pt`` and, after the second save, ``previous.pt`` (the save
before it). Each is written atomically and fsynced (``diffprune.io``). A checkpoint that cannot
be read (empty, truncated, not a checkpoint) is moved aside to ``<name>.corrupt-<time>`` with a
warning, and training resumes from ``previous.pt``, or starts over: a damaged file never blocks a
rerun. A checkpoint of another run (its key differs) is ignored, with a warning naming what
differs.

A run holds an exclusive lock on ``lock`` in its checkpoint folder while it trains, so two
processes never train the same run at once (a rerun while an orphaned job still trains refuses).
Every training takes it: diffusion models, autoencoders and surrogates (through `Run`).

Divergence: the loops do not sync with the device every step, so the mean loss is checked where
it is read anyway (log steps) and the weights before every checkpoint (a loop's last step always
takes one, so this covers its final model too). A non-finite value raises `TrainingDiverged`
naming the step and the last good checkpoint, which is kept: a checkpoint or model with
non-finite weights is never written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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


@dataclass
class Run:
    """One resumable training run's checkpoints in `directory` (None: no checkpoints, no lock).

    A loop takes `lock()` around its training, `resume(key)`s, calls `check_loss` at its log
    steps and `check_weights` then `save` at its checkpoint steps, and `finish`es once its
    outputs are written.
    With several processes, every one checks and only the `main` one locks and writes."""

    directory: Path | None
    name: str = "training"
    main: bool = True
    key: dict[str, Any] | None = None
    last_good: int | None = None  # the step of the newest checkpoint written or resumed

    def __post_init__(self) -> None:
        self.directory = None if self.directory is None else Path(self.directory)

    @property
    def latest(self) -> Path | None:
        return None if self.directory is None else self.directory / LATEST

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """The checkpoint folder's lock (`run_lock`), held by the main process."""
        if self.directory is None or not self.main:
            return contextlib.nullcontext()
        return run_lock(self.directory)

    def resume(self, key: dict[str, Any], *, max_step: int | None = None) -> dict[str, Any] | None:
        """This run's newest checkpoint (`load`) for `key`, which later checkpoints carry."""
        self.key = key
        state = None if self.directory is None else load(self.directory, key, max_step=max_step)
        if state is not None:
            self.last_good = state["step"]
        return state

    def check_loss(self, step: int, loss: float, *, since: int | None = None) -> None:
        """Raise `TrainingDiverged` unless the mean loss of the steps after `since` is finite."""
        if not math.isfinite(loss):
            what = f"mean loss {loss}" + ("" if since is None else f" since step {since}")
            raise self.diverged(step, what)

    def check_weights(
        self, step: int, *modules: torch.nn.Module, what: str = "non-finite weights"
    ) -> None:
        """Raise `TrainingDiverged` with `what` unless every weight of `modules` is finite (one
        host sync). Every checkpoint step calls it before `save`."""
        if not all_finite(*modules):
            raise self.diverged(step, what)

    def save(self, step: int, state: Callable[[], dict[str, Any]]) -> None:
        """Save `state()` with the key and step as the latest checkpoint (the main process; no
        directory: nothing), after `check_weights` passed for the step."""
        if self.directory is not None and self.main:
            save(self.directory, {"key": self.key, "step": step, **state()})
        self.last_good = step

    def finish(self, *, keep: bool = False) -> None:
        """Delete the checkpoints once the run's outputs are written (unless `keep`)."""
        if self.directory is not None and self.main and not keep:
            remove(self.directory)

    def diverged(self, step: int, what: str) -> TrainingDiverged:
        return diverged(
            step, what, last_good=self.last_good, checkpoint=self.latest, name=self.name
        )


def step_generator(*seed: int) -> torch.Generator:
    """A CPU generator that depends only on the integers `seed`: a run's seed prefix and the
    step, e.g. (seed, 0, step) for the diffusion training, (seed, step) for the autoencoder."""
    state = np.random.SeedSequence(list(seed)).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def run_key(cfg: dict[str, Any], *, neutral: Collection[str], **fields: Any) -> dict[str, Any]:
    """A checkpoint's key: the sha256 of `cfg` without the `neutral` keys (those that cannot
    change the weights), plus `fields` (seed, data hashes, ...)."""
    relevant = {k: v for k, v in cfg.items() if k not in neutral}
    cfg_text = json.dumps(relevant, sort_keys=True)
    return {"cfg_sha256": hashlib.sha256(cfg_text.encode()).hexdigest(), **fields}


def array_sha256(array: np.ndarray) -> str:
    """sha256 of an array's shape and C-contiguous bytes (as train_data.KeptRows.sha256 of all
    its rows)."""
    digest = hashlib.sha256(f"{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


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
    step: int,
    what: str,
    *,
    last_good: int | None,
    checkpoint: Path | None,
    name: str = "training",
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
