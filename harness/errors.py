"""User-facing errors: the CLI prints these as one line and exits with code 2."""


class HarnessError(Exception):
    """Bad input found by the harness (recipe, data, checkpoint, ...); the message is one line that
    names the file, the field and what is allowed."""
