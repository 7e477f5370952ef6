"""Errors raised for bad input. Each carries one line that names the problem."""


class DiffpruneError(ValueError):
    """Base class: bad input that the user can fix."""


class ConfigError(DiffpruneError):
    """params.yaml (or a CLI argument) has a bad key or value."""


class DataError(DiffpruneError):
    """An input file or image is missing, corrupt or of the wrong shape."""
