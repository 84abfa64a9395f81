"""The one exception type the CLI turns into a clear one-line message instead of a traceback."""


class KernelError(Exception):
    """Bad input or an unrecoverable condition the user can fix (names the file / field / model)."""
