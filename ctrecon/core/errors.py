"""The one exception type for bad user input: the CLI prints its message on one line and exits 2."""


class InputError(ValueError):
    """Bad input from the user (missing/unreadable file, wrong shape, non-finite values, bad geometry)."""
