"""Reading a user's YAML file (recipes, sweeps) with `yaml.safe_load`; problems become one-line errors
that name the file and, for malformed YAML, the line and column."""

from pathlib import Path
from typing import Any

import yaml

from harness.errors import HarnessError


def read_yaml(path: str | Path, what: str, error: type[HarnessError]) -> Any:
    """The parsed content of `path` (`what` names the kind of file in the not-found message)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} file not found", file=path)
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise error(f"{where.strip()} malformed YAML: {problem}".strip(), file=path) from None
