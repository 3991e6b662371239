"""The one exception type for mistakes a user can make (bad path, unknown key, corrupt data)."""


class BigtrainError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits non-zero."""


def first_line(error: BaseException) -> str:
    """The first line of a library's error message, for one-line `BigtrainError`s."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
