"""Errors meant for people, not for debuggers.

A `UserError` is bad input the user can fix (a missing file, a misspelled recipe key, a malformed line). The CLI
prints its message as one line and exits non-zero; any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """One clear line: where (file, line or key), what is wrong, and what to do about it."""

    exit_code = 2
