"""User-facing errors.

Anything a user can cause with bad input raises a subclass of :class:`PLBOptError`. The CLI prints
its message on one line and exits with status 2, without a traceback; the Slicer module shows it in
an error dialog. Messages name the offending file and say what is wrong with it.
"""


class PLBOptError(Exception):
    """Base class of every error caused by user input or user environment."""


class DatasetError(PLBOptError):
    """A dataset folder, dataset.json or one of its image/label files is invalid."""


class CheckpointError(PLBOptError):
    """A checkpoint is missing, corrupt, or was not written by PLBOpt."""


class ConfigError(PLBOptError):
    """A configuration value or preset name is invalid."""


class TrainingInterrupted(PLBOptError):
    """Training was stopped by a signal or a cancel request; a resumable checkpoint was written."""


class OutputError(PLBOptError):
    """An output path cannot be written (not a folder, not writable) or holds a file that would be
    overwritten without ``--overwrite``."""
