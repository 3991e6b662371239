"""The one exception type for mistakes a user can make (bad path, unknown key, corrupt data)."""

import sys


class BigtrainError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits non-zero."""


def first_line(error: BaseException) -> str:
    """The first line of a library's error message, for one-line `BigtrainError`s."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def print_error(message: str) -> None:
    """`bigtrain: error: <message>` on stderr in one write: stderr writes through, so `print`'s
    separate newline would let another rank's line land in the middle of this one."""
    sys.stderr.write(f"bigtrain: error: {message}\n")
    sys.stderr.flush()
