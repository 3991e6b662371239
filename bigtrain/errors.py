"""The one exception type for mistakes a user can make (bad path, unknown key, corrupt data)."""


class BigtrainError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits non-zero."""
