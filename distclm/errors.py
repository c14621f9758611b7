"""The one exception type that means "the user asked for something we cannot do".

The CLI turns a `UserError` into one line on stderr and exit code 2, with no traceback.
Everything else is a bug or an environment failure and keeps its traceback (exit code 1).
"""


class UserError(Exception):
    """Bad input: a flag, a file, a field. The message says what, where and how to fix it."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's first line, at most `limit` characters (its type name when it has no message): libraries'
    messages run to pages, and a one-line error quotes only their headline."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
