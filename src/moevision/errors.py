"""Exception types raised at moevision's boundaries.

Every error a user can cause (a bad config value, a missing data file, a corrupt checkpoint) is one of
these, with a message that names the field or file and says how to fix it. The CLI prints them as one
line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class MoEVisionError(Exception):
    """Base class of the errors a user can cause."""


class ConfigError(MoEVisionError, ValueError):
    """A config field or argument has a bad value. The message names the field and the value."""


class DataError(MoEVisionError):
    """A data set is missing, truncated or corrupt. The message names the path and what to do."""


class CheckpointError(MoEVisionError):
    """A run directory, checkpoint or pretrained directory is missing or corrupt."""


class DivergenceError(MoEVisionError, FloatingPointError):
    """Training diverged (a non-finite loss). The message names the step and the settings to change."""
