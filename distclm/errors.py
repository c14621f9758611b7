"""The one exception type that means "the user asked for something we cannot do".

The CLI turns a `UserError` into one line on stderr and exit code 2, with no traceback.
Everything else is a bug or an environment failure and keeps its traceback (exit code 1).
"""


class UserError(Exception):
    """Bad input: a flag, a file, a field. The message says what, where and how to fix it."""
