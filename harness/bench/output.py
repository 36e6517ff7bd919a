"""How the benches hand their rows out: a terminal table, a CSV and a JSON file beside each other.

A column is `(key, header, format)`: the row's key, the table's and the CSV's header, and the format spec
its numbers are printed with in the table (the CSV and the JSON keep full precision). A row without the key
shows `-` in the table and an empty cell in the CSV.
"""

import csv
import io
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

Column = tuple[str, str, str]


def table(title: str, columns: list[Column], rows: list[dict]) -> str:
    """The rows as a plain-text table (no colour codes), for `echo`."""
    grid = Table(title=title, title_justify="left")
    for _, header, fmt in columns:
        grid.add_column(header, justify="left" if fmt == "s" else "right")
    for row in rows:
        grid.add_row(*("-" if row.get(key) is None else format(row[key], fmt) for key, _, fmt in columns))
    buffer = io.StringIO()
    Console(file=buffer, width=240, color_system=None, highlight=False).print(grid)
    return buffer.getvalue().rstrip()


def write_csv(path: Path, columns: list[Column], rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([key for key, _, _ in columns])
        writer.writerows([["" if row.get(key) is None else row[key] for key, _, _ in columns] for row in rows])


def write_all(stem: Path, result: dict, columns: list[Column], plot) -> list[Path]:
    """`<stem>.json` (the whole result), `<stem>.csv` (its rows) and `<stem>.png` (`plot(result, path)`);
    the paths written."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.parent / f"{stem.name}.{suffix}" for suffix in ("json", "csv", "png")]
    paths[0].write_text(json.dumps(result, indent=2))
    write_csv(paths[1], columns, result["rows"])
    plot(result, paths[2])
    return paths


def figure(panels: int):
    """A matplotlib figure with `panels` side-by-side axes, drawn with the Agg canvas (no display, no pyplot
    state): `(figure, axes)`; save it with `figure.savefig(path)`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * panels, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, panels, squeeze=False)[0]
