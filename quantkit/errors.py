"""The one exception type for problems the user can fix: bad input, bad options, a full disk.

The CLI catches it and prints its message as one line with a non-zero exit code and no traceback.
Messages name the file, tensor or option at fault.
"""


class QuantkitError(Exception):
    """A user-facing error: the message is printed as is, on one line."""
