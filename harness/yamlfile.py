"""Reading a user's YAML file (recipes, sweeps): every problem becomes one line that names the file and,
where there is one, the place in it (line and column; line and byte for text that is not UTF-8).

The loader is PyYAML's `SafeLoader` (the constructors of `yaml.safe_load`, nothing more), bounded so that no
file can exhaust the recursion limit or the memory of what walks the result (validation, JSON and YAML dumps):
at most `MAX_DEPTH` levels of nesting and `MAX_VALUES` values, a value counted wherever an alias repeats it;
an alias may not refer to the collection that contains it.
"""

from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.reader import ReaderError

from harness.errors import HarnessError

MAX_DEPTH = 32  # a recipe nests 4 levels, a sweep 6
MAX_VALUES = 100_000  # a recipe holds about 60


class _OverBound(ComposerError):
    """Well-formed YAML beyond the loader's bounds."""


class _BoundedLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses (`_OverBound`) documents deeper than MAX_DEPTH, larger than MAX_VALUES,
    or with a recursive alias."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._values: dict[int, int] = {}  # id(node) -> values in it, aliases expanded

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if self._depth == MAX_DEPTH:
            raise _OverBound(None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(event, yaml.AliasEvent):
            if id(node) not in self._values:
                raise _OverBound(None, None, f"alias *{event.anchor} refers to a collection that contains it",
                                 event.start_mark)
            return node
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        values = 1 + sum(self._values[id(child)] for child in children)
        if values > MAX_VALUES:
            raise _OverBound(None, None, f"more than {MAX_VALUES:,} values (aliases counted where used)",
                             node.start_mark)
        self._values[id(node)] = values
        return node


def read_yaml(path: str | Path, what: str, error: type[HarnessError]) -> Any:
    """The parsed content of the YAML file `path` (None for an empty one); `what` names the kind of file.

    Raises `error` with `file=path` and one line when the path is missing or not a regular file, cannot be
    read, is not UTF-8 text, is malformed YAML, or exceeds the loader's bounds (module docstring)."""
    path = Path(path)
    if path.is_dir():
        raise error(f"is a directory, not a {what} file", file=path)
    if not path.exists():
        raise error(f"{what} file not found", file=path)
    if not path.is_file():
        raise error(f"not a regular file; a {what} is a YAML file", file=path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"cannot read the {what} file: {e.strerror}", file=path) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise error(f"line {line}, byte {e.start}: not UTF-8 text ({data[e.start:e.end]!r}); save the file as UTF-8",
                    file=path) from None
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader: as safe as yaml.safe_load
    except yaml.YAMLError as e:
        raise error(_yaml_problem(e, text), file=path) from None


def _yaml_problem(e: yaml.YAMLError, text: str) -> str:
    """`line L, column C: malformed YAML: <problem>` (or, past a bound, `line L, column C: <bound>`) for PyYAML's
    error `e` about `text`."""
    mark = getattr(e, "problem_mark", None)
    if isinstance(e, ReaderError):  # a character YAML does not allow (a control character)
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        return f"line {line}, column {column}: malformed YAML: character {chr(e.character)!r} is not allowed"
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{where}{problem}" if isinstance(e, _OverBound) else f"{where}malformed YAML: {problem}"
