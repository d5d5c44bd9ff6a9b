"""Every user-error type, in one place: a user's mistake, as opposed to a bug.

The entry points (`asif_exp/cli.py`) print one of these as one line `error: ...` and exit 1;
any other exception is a bug and keeps its traceback. This module imports nothing from the
project, so any layer can raise these without importing the layers that catch them.
"""


class ConfigError(ValueError):
    """A config value or combination that cannot be right, named by its key."""


class DataError(ValueError):
    """Missing or malformed data, with where it was looked for."""


class ModelFormatError(ValueError):
    """A saved model directory that is missing, damaged or of an unknown format."""


class ResultsFormatError(ValueError):
    """A results file that cannot be read as a results record."""


USER_ERRORS = (ConfigError, DataError, ModelFormatError, ResultsFormatError)
