"""User-facing errors: the CLI prints these as one line and exits with code 2.

Errors are raised plainly where they are found, naming the field and what is allowed
(`data.batch_size: 130 must be a multiple of the 4 processes`), and prefixed with the file once, where a
caller that knows the file catches them (`in_file`, used by the CLI around a recipe or sweep file). An
error about another file (a checkpoint, a DeepSpeed JSON, a data folder) names that file itself by being
raised with `file=`, and then keeps it.
"""

from collections.abc import Iterator
from contextlib import contextmanager

# what str.splitlines() splits at, written as its escape: an error prints as one line even when it quotes a
# user's key with a line break in it
_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


class HarnessError(Exception):
    """Bad input found by the harness (recipe, data, checkpoint, ...): one line naming the field and what is
    allowed; `file` is the file it is about, when known (printed first)."""

    def __init__(self, message: str, file: str | None = None):
        super().__init__(message)
        self.message = message
        self.file = None if file is None else str(file)

    def __str__(self) -> str:
        text = f"{self.file}: {self.message}" if self.file else self.message
        return text.translate(_LINE_BREAKS)

    def __reduce__(self):  # pickled across processes (Ray workers) with its file
        return type(self), (self.message, self.file)


@contextmanager
def in_file(path) -> Iterator[None]:
    """Name `path` in every `HarnessError` raised inside that does not name a file yet."""
    try:
        yield
    except HarnessError as error:
        if error.file is None:
            error.file = str(path)
        raise
