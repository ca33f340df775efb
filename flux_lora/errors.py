"""User-facing errors: each one is printed by the CLI as a single stderr line."""


class FluxLoraError(Exception):
    """Base class. The message names the problem and the fix in one line."""

    exit_code = 2


class ConfigError(FluxLoraError):
    """Bad configuration: unknown key, wrong type, invalid value."""


class DataError(FluxLoraError):
    """Bad input data: empty dataset, unreadable image, unsafe archive."""


class ModelError(FluxLoraError):
    """Model path or hub id that cannot be loaded."""


class CacheError(FluxLoraError):
    """A cache that is missing, corrupt or built for other settings."""


class CheckpointError(FluxLoraError):
    """A checkpoint or output directory that cannot be used."""


class StoppedError(FluxLoraError):
    """The run stopped on request (signal) after writing a checkpoint; rerun to resume."""

    exit_code = 3


class DivergedError(FluxLoraError):
    """Training produced non-finite losses too many times in a row."""

    exit_code = 4


class RankFailedError(FluxLoraError):
    """Another rank reported a failure; this rank stops too."""

    exit_code = 5
