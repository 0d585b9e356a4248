"""The one exception type for bad user input.

An ``InputError`` message names the file, line or field at fault. The command
line prints it alone (no traceback) and exits with status 2.
"""


class InputError(ValueError):
    """Bad input from the user: a file, a line of it, a config field, a flag."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf. The message names the steps and the last good checkpoint."""
