"""User-facing errors: one line that names the bad value and what would be valid.

`launch.py` prints these without a traceback and exits with status 2; anything else is a bug.
"""

# Messages that end a resumable run say "... run the same command"; launch.py puts the exact command in its place.
SAME_COMMAND = "the same command"


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint); the message is the whole report."""


class ConfigError(UserError):
    """An invalid configuration value, detected before any work starts."""


class DataError(UserError):
    """A dataset that is missing, not prepared or malformed."""


class CheckpointError(UserError):
    """A checkpoint directory that is missing, empty, damaged or incompatible."""


class WorkdirError(UserError):
    """A workdir that cannot be written, or that another run is using."""


class DivergedError(UserError):
    """The loss or gradient became non-finite, or the loss exploded; the message names the step and the terms."""
