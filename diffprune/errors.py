"""Errors raised for bad input. Each carries one line that names the problem."""


class DiffpruneError(ValueError):
    """Base class: bad input that the user can fix."""


class ConfigError(DiffpruneError):
    """params.yaml (or a CLI argument) has a bad key or value."""


class DataError(DiffpruneError):
    """An input file or image is missing, corrupt or of the wrong shape."""


class DiskFull(DiffpruneError):
    """The file system of an output has too little free space for it; the message names the
    path, the bytes needed and the bytes available."""


class TrainingDiverged(DiffpruneError):
    """Training produced a non-finite loss or weights; the message names the step and the last
    good checkpoint, which is kept."""

    def __init__(self, message: str, *, step: int, last_good_step: int | None) -> None:
        super().__init__(message)
        self.step = step
        self.last_good_step = last_good_step


class SamplingFailed(DiffpruneError):
    """Sampling from a model folder produced non-finite values."""
