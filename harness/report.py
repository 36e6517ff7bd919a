"""MLflow runs -> pandas -> paper-style tables (Markdown, LaTeX, CSV) and plots (PNG): `harness table`, `plot`.

`runs_frame` reads the FINISHED runs of one experiment (optionally one sweep: tag `sweep.id`; sweep parent
runs and a tuned sweep's tuning-stage runs left out) into a DataFrame, one row per run. A key names a run tag
(method, neuron, T, readout, seed, dataset, backbone, recipe; set at launch), else a param (any dotted recipe
field, `optim.lr`), else a sweep tag (`variant` -> `sweep.variant`). A metric is the run's last logged value.

`comparison` groups runs by the row keys and the column key and aggregates the metric over the runs of a
cell (the seeds): `mean_std` = mean +- sample standard deviation (n - 1 in the denominator; none for one
run) with the count n of runs; `mean`, `min`, `max`. A row none of whose runs has the column key (the ANN
has no T) is T-independent: its one value is shown in every column. A run that logged the metric per
column value, `<metric>_<col><v>` (qcfs evaluates its converted SNN at every T: `test/acc1_T4`), fills
those columns instead of its own (`plot` pairs energies with accuracies of the same kind only), unless it is a
final run of a tuned sweep (tag `tuning.config`): its configuration was chosen for its own T, so it fills only
that column.
Reference rows come from YAML files of published numbers (`results/reference/*.yaml`, schema
`ReferenceFile`): the entries for the table's metric and data set(s), each shown with its citation, source
and status (`STATUSES`: verified, primary, second-hand, unverified).
Runs of a tuned sweep's final stage add, below the table, what the tuning chose per cell (`tuning_table`):
the configuration, its validation score, the configurations and epochs the cell's tuning spent, and the seeds.
Footnotes (`footnotes`: a row key value -> text) mark the rows they apply to and follow the table.
Markdown and LaTeX print the wide table; CSV writes the long form, one line per cell with mean, std, n.
"""

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pandas as pd
import yaml
from pydantic import Field, ValidationError

from harness import track
from harness.errors import HarnessError
from harness.recipe import Section

FORMATS = ("md", "latex", "csv")
AGGREGATES = ("mean_std", "mean", "min", "max")
NO_VALUE = "none"  # what a run tag holds where the key does not apply (the ANN's T)


class ReportError(HarnessError):
    pass


# How far a published number has been traced, printed beside its row so that an unverified figure never reads
# like a measured one.
STATUSES = {
    "verified": "read in the paper's own table by us",
    "primary": "from the authors' own release (README, code), not from the paper's tables",
    "second-hand": "as another paper lists it (its source names that paper and table)",
    "unverified": "commonly quoted; no source we could check",
}


class ReferenceEntry(Section):
    """One published number, with where it was found (`source`) and how far that was traced (`status`)."""

    dataset: str
    backbone: str | None = None
    method: str
    neuron: str | None = None
    T: int | None = None
    metric: str = "test/acc1"
    value: float
    std: float | None = None
    status: Literal[tuple(STATUSES)]  # see STATUSES
    source: str  # where the number was read: "Table 2", "authors' README", "CLIF (ICML 2024), Table 3"
    note: str | None = None  # what differs from the measured setting (frames, augmentation, ...)


class ReferenceFile(Section):
    """A file of published numbers from one source."""

    citation: str  # full reference
    label: str  # short name for table rows, e.g. "Meng et al. 2022"
    url: str | None = None
    entries: list[ReferenceEntry] = Field(min_length=1)


# ------------------------------------------------------------------------------------------------ runs
def runs_frame(experiment: str, uri: str, sweep: str | None = None) -> pd.DataFrame:
    """The FINISHED runs of `experiment` (of sweep `sweep` if given) as columns run_id, tags.*, params.*,
    metrics.*; ReportError if the experiment does not exist or holds no such run."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ReportError(f"no MLflow store at {uri} (the file does not exist); pass --tracking-uri or set "
                          f"MLFLOW_TRACKING_URI")
    runs = track.find_runs(uri, experiment, {"sweep.id": sweep} if sweep else None, status="FINISHED")
    rows = [{"run_id": run.run_id, **{f"tags.{k}": v for k, v in run.tags.items()},
             **{f"params.{k}": v for k, v in run.params.items()},
             **{f"metrics.{k}": v for k, v in run.metrics.items()}}
            for run in runs if run.tags.get("sweep.role") != "parent" and run.tags.get("sweep.stage") != "tune"]
    if not rows:
        names = track.experiment_names(uri)
        if experiment not in names:
            raise ReportError(f"experiment {experiment!r} not found at {uri}; experiments there: "
                              f"{', '.join(sorted(names)) or '(none)'}")
        where = f" of sweep {sweep!r}" if sweep else ""
        raise ReportError(f"experiment {experiment!r} at {uri} holds no FINISHED run{where}")
    return pd.DataFrame(rows)


def key_column(frame: pd.DataFrame, key: str) -> pd.Series:
    """The values of `key` per run: tag, else param, else sweep tag; NO_VALUE where a run lacks it."""
    for column in (f"tags.{key}", f"params.{key}", f"tags.sweep.{key}"):
        if column in frame:
            return frame[column].fillna(NO_VALUE).astype(str)
    tags = sorted(c.removeprefix("tags.") for c in frame if c.startswith("tags.") and not c.startswith("tags.mlflow"))
    raise ReportError(f"key {key!r} is neither a tag nor a param of these runs; tags: {', '.join(tags)}; "
                      f"params: any dotted recipe field (e.g. optim.lr)")


def metric_column(frame: pd.DataFrame, metric: str) -> pd.Series:
    column = f"metrics.{metric}"
    if column not in frame or frame[column].isna().all():
        metrics = sorted(c.removeprefix("metrics.") for c in frame if c.startswith("metrics."))
        shown = ", ".join(m for m in metrics if "/" not in m or m.split("/")[0] in ("test", "train", "efficiency"))
        raise ReportError(f"metric {metric!r} is in none of the {len(frame)} runs; metrics there include: {shown}")
    return frame[column]


# ----------------------------------------------------------------------------------------------- cells
def _sort_key(value: str) -> tuple:
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def _aggregate(values: pd.Series, agg: str) -> dict[str, float]:
    values = values.dropna()
    n = len(values)
    if agg == "mean_std":
        return {"mean": values.mean(), "std": values.std(ddof=1) if n > 1 else math.nan, "n": n}
    return {"mean": getattr(values, agg)(), "std": math.nan, "n": n}


def tuned_runs(frame: pd.DataFrame) -> pd.Series:
    """Which runs are final runs of a tuned sweep (tag `tuning.config`)."""
    return frame["tags.tuning.config"].notna() if "tags.tuning.config" in frame else pd.Series(False, frame.index)


def per_column_values(frame: pd.DataFrame, col: str | None, metric: str) -> pd.DataFrame:
    """Long form (run index, column value, metric value): a run's `metric` at its own column value, or, for
    a run that logged `<metric>_<col><v>` (a run evaluated at several T, e.g. qcfs' `test/acc1_T4`), one
    line per such v instead (`expanded` True). Without a column key every run has the column value ''."""
    own = pd.DataFrame({"run": frame.index, "column": key_column(frame, col) if col else "",
                        "value": metric_column(frame, metric), "expanded": False})
    if not col:
        return own.dropna(subset=["value"])
    prefix = f"metrics.{metric}_{col}"
    free = frame[~tuned_runs(frame)]  # a tuned run's configuration was chosen for its own column value only
    expanded = [pd.DataFrame({"run": free.index, "column": c.removeprefix(prefix), "value": free[c],
                              "expanded": True})
                for c in free if c.startswith(prefix) and c.removeprefix(prefix).isdigit()]
    if not expanded:
        return own.dropna(subset=["value"])
    expanded = pd.concat(expanded).dropna(subset=["value"])
    return pd.concat([own[~own["run"].isin(expanded["run"])], expanded]).dropna(subset=["value"])


def measured_cells(frame: pd.DataFrame, rows: list[str], col: str | None, metric: str, agg: str) -> pd.DataFrame:
    """Long form: one line per (row keys, column value) with mean, std, n over the runs of that cell.
    A T-independent row (no run has the column key) gets the column value NO_VALUE."""
    data = per_column_values(frame, col, metric)
    for key in rows:
        data[key] = key_column(frame, key).loc[data["run"]].to_numpy()
    cells = [{**dict(zip(rows, keys, strict=True)), col or "column": column, **_aggregate(group["value"], agg)}
             for (*keys, column), group in data.groupby([*rows, "column"], sort=False)]
    out = pd.DataFrame(cells)
    out["source"] = "measured"
    return out


def load_references(paths: list[str]) -> list[tuple[ReferenceFile, Path]]:
    """Reference files; a folder stands for its *.yaml."""
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            files += sorted(path.glob("*.yaml"))
        elif path.is_file():
            files.append(path)
        else:
            raise ReportError(f"--reference {given}: no such file or folder")
    loaded = []
    for path in files:
        try:
            loaded.append((ReferenceFile.model_validate(yaml.safe_load(path.read_text())), path))
        except ValidationError as e:
            error = e.errors()[0]
            field = ".".join(str(p) for p in error["loc"])
            raise ReportError(f"{path}: {field}: {error['msg']}") from None
        except yaml.YAMLError as e:
            raise ReportError(f"{path}: malformed YAML: {str(e).splitlines()[0]}") from None
    return loaded


def reference_cells(references: list[tuple[ReferenceFile, Path]], rows: list[str], col: str | None, metric: str,
                    datasets: set[str]) -> pd.DataFrame:
    """Long-form cells of the published numbers for `metric` on `datasets`."""
    cells = []
    for ref, _path in references:
        for entry in ref.entries:
            if entry.metric != metric or entry.dataset not in datasets:
                continue
            keys = {key: str(getattr(entry, key, None) or NO_VALUE) for key in rows}
            column = str(getattr(entry, col, None) or NO_VALUE) if col else ""
            details = "; ".join(x for x in (entry.source, entry.backbone, entry.note) if x)
            cells.append({**keys, col or "column": column, "mean": entry.value,
                          "std": entry.std if entry.std is not None else math.nan, "n": math.nan,
                          "source": f"{ref.label} [{entry.status}] ({details})", "citation": ref.citation})
    return pd.DataFrame(cells)


def _format_cell(mean: float, std: float, n: float, precision: int) -> str:
    text = f"{mean:.{precision}f}"
    if not math.isnan(std):
        text += f" ± {std:.{precision}f}"
    if not math.isnan(n):
        text += f" (n={int(n)})"
    return text


def wide_table(cells: pd.DataFrame, rows: list[str], col: str | None, precision: int) -> pd.DataFrame:
    """Rows = (source, row keys); columns = `col=value`; a T-independent row repeats its value."""
    col_name = col or "column"
    columns = sorted({c for c in cells[col_name] if c != NO_VALUE}, key=_sort_key) or [NO_VALUE]
    lines = []
    for (source, *keys), group in cells.groupby(["source", *rows], sort=False):
        line = {"source": source, **dict(zip(rows, keys, strict=True))}
        by_column = {c: r for c, r in zip(group[col_name], group.itertuples(), strict=True)}
        independent = set(by_column) == {NO_VALUE}
        for column in columns:
            cell = by_column.get(NO_VALUE if independent else column)
            label = f"{col}={column}" if col else "value"
            line[label] = _format_cell(cell.mean, cell.std, cell.n, precision) if cell is not None else ""
        lines.append(line)
    table = pd.DataFrame(lines)
    order = sorted(range(len(table)), key=lambda i: (table["source"][i] != "measured",
                                                     [_sort_key(str(table[k][i])) for k in rows]))
    return table.iloc[order].reset_index(drop=True)


def _short_config(config: str) -> str:
    """`{"method.vth.init": 3.16278, "optim.lr": 0.0471}` -> `vth.init=3.16, lr=0.0471` (a method field without
    `method.`, any other by its last part; 3 significant digits)."""
    values = json.loads(config)
    return ", ".join(f"{k.removeprefix('method.') if k.startswith('method.') else k.split('.')[-1]}="
                     f"{f'{v:.3g}' if isinstance(v, float) else v}" for k, v in values.items()) or "(defaults)"


def tuning_table(frame: pd.DataFrame, rows: list[str], col: str | None) -> pd.DataFrame | None:
    """Per cell (row keys and column value) of a tuned sweep's final runs: the chosen configuration, its score
    on the validation split, the configurations and epochs the cell's tuning spent, and the seeds of its runs;
    None if no run was tuned."""
    tuned = frame[tuned_runs(frame)]
    if tuned.empty:
        return None
    keys = [*rows, col] if col else list(rows)
    lines = []
    for values, group in tuned.groupby([key_column(tuned, k) for k in keys], sort=False):
        first = group.iloc[0]
        lines.append({**dict(zip(keys, values, strict=True)),
                      "chosen configuration": _short_config(first["tags.tuning.config"]),
                      "validation": f"{first['tags.tuning.metric']} {float(first['tags.tuning.score']):.2f}",
                      "configurations tried": first["tags.tuning.trials"],
                      "tuning epochs": first["tags.tuning.epochs"],
                      "seeds": ", ".join(sorted(key_column(group, "seed"), key=_sort_key))})
    table = pd.DataFrame(lines)
    order = sorted(range(len(table)), key=lambda i: [_sort_key(str(table[k][i])) for k in keys])
    return table.iloc[order].reset_index(drop=True)


def mark_footnotes(table: pd.DataFrame, rows: list[str], footnotes: dict[str, str]) -> list[str]:
    """Append `[a]`, `[b]`, ... to the first row-key column (in `rows` order) whose value is a footnote's key, in
    every row that has it; return the footnote lines. A key that matches no row is an error (a footnote must not
    silently disappear)."""
    lines = []
    for i, (key, text) in enumerate(footnotes.items()):
        mark = f"[{chr(ord('a') + i)}]"
        column = next((c for c in rows if (table[c].astype(str) == key).any()), None)
        if column is None:
            raise ReportError(f"--footnote {key}=...: no row has the value {key!r} in {', '.join(rows)}")
        matches = table[column].astype(str) == key
        table.loc[matches, column] = table.loc[matches, column].astype(str) + f" {mark}"
        lines.append(f"{mark} {text}")
    return lines


# ---------------------------------------------------------------------------------------------- render
def to_markdown(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _latex_escape(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                          ("$", r"\$"), ("{", r"\{"), ("}", r"\}")):
        text = text.replace(char, escaped)
    return text.replace("±", r"$\pm$")


def to_latex(table: pd.DataFrame, caption: str, notes: list[str] = ()) -> str:
    spec = "l" * (len(table.columns) - sum(c.startswith(("T=", "value")) for c in table.columns))
    spec += "r" * (len(table.columns) - len(spec))
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_latex_escape(caption)}}}",
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(_latex_escape(str(c)) for c in table.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(_latex_escape(str(v)) for v in row) + r" \\" for row in table.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [rf"\par\footnotesize {_latex_escape(note)}" for note in notes]
    lines += [r"\end{table}"]
    return "\n".join(lines)


def comparison(experiment: str, uri: str, rows: list[str], col: str | None, metric: str,
               agg: Literal["mean_std", "mean", "min", "max"] = "mean_std", fmt: str = "md",
               sweep: str | None = None, references: list[str] = (), precision: int = 2,
               note: Callable[[str], None] = print, footnotes: dict[str, str] | None = None) -> str:
    """The comparison table as text in `fmt`, followed (md, LaTeX) by its footnotes and, for a tuned sweep, the
    tuning table; `note` gets one line about reference rows left out."""
    frame = runs_frame(experiment, uri, sweep)
    cells = measured_cells(frame, rows, col, metric, agg)
    if references:
        datasets = set(key_column(frame, "dataset"))
        published = reference_cells(load_references(list(references)), rows, col, metric, datasets)
        if published.empty:
            note(f"no reference entry for metric {metric!r} on {', '.join(sorted(datasets))}")
        cells = pd.concat([cells, published], ignore_index=True)
    if fmt == "csv":
        return cells.to_csv(index=False)
    table = wide_table(cells, rows, col, precision)
    notes = mark_footnotes(table, rows, footnotes or {})
    tuning = tuning_table(frame, rows, col)
    where = f"experiment {experiment}" + (f", sweep {sweep}" if sweep else "")
    if fmt == "latex":
        text = to_latex(table, f"{metric} ({agg.replace('_', ' ± ')} over runs) in {where}", notes)
        if tuning is not None:
            text += "\n\n" + to_latex(tuning, f"What the equal tuning budget chose per cell ({where}); the rows above "
                                              f"train each choice on the whole training set with these seeds")
        return text
    text = to_markdown(table) + "".join(f"\n\n{line}" for line in notes)
    if tuning is not None:
        text += (f"\n\nTuning ({where}): each cell's configuration chosen on the held-out validation split; the "
                 f"table above trains it on the whole training set once per seed and tests it.\n\n"
                 + to_markdown(tuning))
    return text


# ------------------------------------------------------------------------------------------------ plot
def plot(experiment: str, uri: str, output: str | Path, metric: str = "test/acc1",
         energy: str = "efficiency/energy_uj", series: list[str] = ("method", "neuron"), x: str = "T",
         sweep: str | None = None) -> Path:
    """Two panels to PNG: `metric` vs `x` (mean +- std over runs, T-independent series as a band) and
    `metric` vs `energy` per series (points labelled with x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = runs_frame(experiment, uri, sweep)
    names = pd.Series([" ".join(v for v in values if v != NO_VALUE)
                       for values in zip(*(key_column(frame, k) for k in series), strict=True)], index=frame.index)
    data = per_column_values(frame, x, metric).rename(columns={"value": "y"})
    data["energy"] = math.nan
    if f"metrics.{energy}" in frame:  # a run's energy at T only from the same kind of metric as its accuracy
        spent = per_column_values(frame, x, energy).rename(columns={"value": "energy"})
        data = data.drop(columns="energy").merge(spent, on=["run", "column", "expanded"], how="left")
    data["series"] = names.loc[data["run"]].to_numpy()
    data = data.rename(columns={"column": "x"})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = sorted({float(v) for v in data["x"] if v != NO_VALUE})
    for i, (name, group) in enumerate(data.groupby("series", sort=True)):
        color = f"C{i}"
        stats = group.groupby("x").agg(y=("y", "mean"), y_std=("y", "std"), energy=("energy", "mean"))
        if set(stats.index) == {NO_VALUE}:
            row = stats.loc[NO_VALUE]
            left.axhline(row.y, color=color, linestyle="--", label=f"{name} (no {x})")
            if not math.isnan(row.y_std):
                left.axhspan(row.y - row.y_std, row.y + row.y_std, color=color, alpha=0.15)
            right.scatter([row.energy], [row.y], color=color, marker="s", label=name)
            continue
        stats = stats.drop(index=NO_VALUE, errors="ignore")
        stats.index = stats.index.astype(float)
        stats = stats.sort_index()
        left.errorbar(stats.index, stats.y, yerr=stats.y_std.fillna(0), color=color, marker="o", capsize=3,
                      label=name)
        right.plot(stats.energy, stats.y, color=color, marker="o", label=name)
        for value, row in stats.iterrows():
            right.annotate(f"{x}={value:g}", (row.energy, row.y), fontsize=7, xytext=(3, 3),
                           textcoords="offset points")
    left.set(xscale="log", xlabel=x, ylabel=metric, title=f"{metric} vs {x}")
    if xs:
        left.set_xticks(xs, [f"{v:g}" for v in xs])
        left.minorticks_off()
    right.set(xscale="log", xlabel=f"{energy} per sample", ylabel=metric, title=f"{metric} vs energy")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{experiment}" + (f" / sweep {sweep}" if sweep else "") + f" ({len(frame)} runs)", fontsize=10)
    return _save(fig, output)


def _save(fig, output: str | Path) -> Path:
    """Write `fig` to the PNG `output` (its folder made), close it, return the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=130)
    plt.close(fig)
    return output


def curves(experiment: str, uri: str, output: str | Path, metric: str = "test/acc1",
           series: list[str] = ("method", "neuron"), panel: str = "T", sweep: str | None = None) -> Path:
    """Training curves to PNG: `metric` per epoch, one panel per value of `panel` (T), one line per series (the
    mean over its runs, the seeds, with a +-std band); a series without `panel` (the ANN) is drawn in every
    panel, dashed. Shows whether the runs had converged by their last epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = runs_frame(experiment, uri, sweep)
    names = [" ".join(v for v in values if v != NO_VALUE)
             for values in zip(*(key_column(frame, k) for k in series), strict=True)]
    panels = key_column(frame, panel)
    histories = []
    for run_id, name, where in zip(frame["run_id"], names, panels, strict=True):
        for step, value in track.metric_history(uri, run_id, metric):
            histories.append({"series": name, "panel": where, "epoch": step, "value": value})
    if not histories:
        raise ReportError(f"no run of experiment {experiment!r} logged {metric!r} per epoch")
    data = pd.DataFrame(histories)
    columns = sorted({p for p in data["panel"] if p != NO_VALUE}, key=_sort_key) or [NO_VALUE]
    fig, axes = plt.subplots(1, len(columns), figsize=(3.6 * len(columns), 3.6), sharey=True, squeeze=False)
    colors = {name: f"C{i}" for i, name in enumerate(sorted(set(data["series"])))}
    for ax, column in zip(axes[0], columns, strict=True):
        shown = data[(data["panel"] == column) | (data["panel"] == NO_VALUE)]
        for name, group in shown.groupby("series", sort=True):
            stats = group.groupby("epoch")["value"].agg(["mean", "std"]).fillna(0.0)
            independent = set(group["panel"]) == {NO_VALUE}
            ax.plot(stats.index, stats["mean"], color=colors[name], linestyle="--" if independent else "-",
                    label=name)
            ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"],
                            color=colors[name], alpha=0.15)
        ax.set(title=f"{panel}={column}" if column != NO_VALUE else "", xlabel="epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric)
    low = data.groupby(["series", "panel", "epoch"])["value"].mean()
    axes[0][0].set_ylim(max(0.0, float(low[low.index.get_level_values("epoch") > 1].min()) - 2), None)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{metric} per epoch, mean ± std over seeds: {experiment}" + (f" / sweep {sweep}" if sweep else ""),
                 fontsize=10)
    return _save(fig, output)
