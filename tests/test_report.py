"""Tables and plots from MLflow: aggregation over seeds, T-independent rows, per-T metrics, reference rows.

Runs are written to a real sqlite MLflow store in tmp_path with the tags `harness launch` sets.
"""

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from harness.report import ReportError, comparison, curves, load_references, plot

ROOT = Path(__file__).resolve().parents[1]


def log_run(client, experiment_id, tags, metrics, status="FINISHED"):
    run = client.create_run(experiment_id, tags={"dataset": "digits", **tags})
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, status=status)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("cmp")
    ann, dsr = {"method": "ann", "neuron": "none", "T": "none"}, {"method": "dsr", "neuron": "if"}
    log_run(client, exp, {**ann, "seed": "0"}, {"test/acc1": 90.0, "efficiency/energy_uj": 2.0})
    log_run(client, exp, {**ann, "seed": "1"}, {"test/acc1": 92.0, "efficiency/energy_uj": 2.0})
    log_run(client, exp, {**dsr, "T": "1", "seed": "0"}, {"test/acc1": 80.0, "efficiency/energy_uj": 0.5})
    log_run(client, exp, {**dsr, "T": "1", "seed": "1"}, {"test/acc1": 84.0, "efficiency/energy_uj": 0.7})
    log_run(client, exp, {**dsr, "T": "4", "seed": "0"}, {"test/acc1": 88.0, "efficiency/energy_uj": 1.0})
    log_run(client, exp, {**dsr, "T": "4", "seed": "1"}, {"test/acc1": 99.0}, status="FAILED")  # left out
    # a run evaluated at several T (qcfs): its per-T metrics fill the columns, not its headline T
    log_run(client, exp, {"method": "qcfs", "neuron": "none", "T": "4", "seed": "0"},
            {"test/acc1": 85.0, "test/acc1_T1": 50.0, "test/acc1_T4": 85.0, "test/acc1_T8": 88.0})
    return uri


def cells(markdown: str, keys: int = 2) -> dict[str, list[str]]:
    """{"<method>/<source>": [cells of the columns]} of a Markdown table with `keys` row keys."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in markdown.strip().splitlines()[2:]]
    return {f"{row[1]}/{row[0]}": row[1 + keys:] for row in rows}


def test_table_aggregates_finished_runs_per_cell(store):
    text = comparison("cmp", store, ["method", "neuron"], "T", "test/acc1")
    assert text.splitlines()[0] == "| source | method | neuron | T=1 | T=4 | T=8 |"
    table = cells(text)
    assert table["ann/measured"] == ["91.00 ± 1.41 (n=2)"] * 3  # T-independent: the same in every column
    assert table["dsr/measured"] == ["82.00 ± 2.83 (n=2)", "88.00 (n=1)", ""]  # the FAILED run is not counted
    assert table["qcfs/measured"] == ["50.00 (n=1)", "85.00 (n=1)", "88.00 (n=1)"]
    assert list(table) == ["ann/measured", "dsr/measured", "qcfs/measured"]


def test_other_aggregates_formats_and_no_column(store):
    best = cells(comparison("cmp", store, ["method"], "T", "test/acc1", agg="max", precision=1), keys=1)
    assert best["dsr/measured"][0] == "84.0 (n=2)"
    csv = comparison("cmp", store, ["method"], "T", "test/acc1", fmt="csv").splitlines()
    assert csv[0] == "method,T,mean,std,n,source"
    assert "dsr,1,82.0,2.8284271247461903,2,measured" in csv
    latex = comparison("cmp", store, ["method", "neuron"], "T", "test/acc1", fmt="latex")
    assert r"91.00 $\pm$ 1.41 (n=2)" in latex and r"test/acc1" in latex and r"\begin{tabular}{lllrrr}" in latex
    single = cells(comparison("cmp", store, ["method"], None, "efficiency/energy_uj"), keys=1)
    assert single["dsr/measured"] == ["0.73 ± 0.25 (n=3)"]


def test_reference_rows_match_metric_and_dataset(store, tmp_path):
    ref = tmp_path / "ref.yaml"
    ref.write_text(yaml.safe_dump({
        "citation": "A. Author. A paper. 2030.", "label": "Author 2030",
        "entries": [{"dataset": "digits", "method": "dsr", "neuron": "if", "T": 4, "value": 97.5, "std": 0.1,
                     "source": "Table 3", "status": "verified"},
                    {"dataset": "cifar10", "method": "dsr", "neuron": "if", "T": 4, "value": 95.0, "source": "Table 1",
                     "status": "verified"},
                    {"dataset": "digits", "method": "dsr", "neuron": "if", "T": 4, "metric": "test/acc5",
                     "value": 99.9, "source": "Table 3", "status": "verified"},
                    {"dataset": "digits", "method": "dsr", "neuron": "lif", "T": 2, "value": 90.0,
                     "source": "B (2031), Table 9", "status": "second-hand", "note": "with augmentation"}]}))
    table = cells(comparison("cmp", store, ["method", "neuron"], "T", "test/acc1", references=[str(ref)]))
    # columns T=1, 2 (the second-hand entry's), 4, 8; the status is printed beside each number, with where it
    # was read and what differs
    assert table["dsr/Author 2030 [verified] (Table 3)"] == ["", "", "97.50 ± 0.10", ""]
    assert table["dsr/Author 2030 [second-hand] (B (2031), Table 9; with augmentation)"] == ["", "90.00", "", ""]
    assert len(table) == 5  # measured ann, dsr, qcfs + two reference rows (cifar10 and acc5 entries left out)
    notes = []
    comparison("cmp", store, ["method"], "T", "test/acc1",
               references=[str(ROOT / "results" / "reference")], note=notes.append)
    assert notes == ["no reference entry for metric 'test/acc1' on digits"]


def test_the_shipped_reference_file_states_each_figures_status(tmp_path):
    [(ref, _path)] = load_references([str(ROOT / "results" / "reference" / "dsr_meng2022.yaml")])
    status = {(e.dataset, e.neuron, e.T, e.value): e.status for e in ref.entries}
    assert status == {("cifar10", None, 5, 94.45): "primary", ("cifar10", "lif", 20, 95.40): "second-hand",
                      ("cifar100", None, 20, 78.50): "second-hand", ("dvs_cifar10", None, 10, 77.3): "second-hand",
                      ("imagenet", None, 50, 67.74): "unverified"}
    dvs = next(e for e in ref.entries if e.dataset == "dvs_cifar10")
    assert "20 frames" in dvs.note and "augmentation" in dvs.note  # the setting differs from the T=20 recipes'
    bad = ref.model_dump()
    del bad["entries"][0]["status"]
    (tmp_path / "nostatus.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ReportError, match=r"nostatus\.yaml: entries\.0\.status: Field required"):
        load_references([str(tmp_path / "nostatus.yaml")])


def test_bad_inputs_are_one_line_errors(store, tmp_path):
    with pytest.raises(ReportError, match="no MLflow store at"):
        comparison("cmp", f"sqlite:///{tmp_path / 'missing.db'}", ["method"], "T", "test/acc1")
    with pytest.raises(ReportError, match="holds no FINISHED run of sweep 'x'"):
        comparison("cmp", store, ["method"], "T", "test/acc1", sweep="x")
    with pytest.raises(ReportError, match="key 'optimizer' is neither a tag nor a param"):
        comparison("cmp", store, ["optimizer"], "T", "test/acc1")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"citation": "c", "label": "l", "entries": [{"dataset": "d", "method": "m"}]}))
    with pytest.raises(ReportError, match=r"bad\.yaml: entries\.0\.value: Field required"):
        load_references([str(bad)])


def test_plot_writes_a_png(store, tmp_path):
    out = plot("cmp", store, tmp_path / "plots" / "cmp.png")
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 10_000


def test_curves_of_runs_that_logged_one_epoch_write_a_png(store, tmp_path):
    """Every run in `store` logged its metrics once (step 0): the curves have one point each, and the y range
    (from epochs after the first, none here) falls back to starting at 0."""
    out = curves("cmp", store, tmp_path / "curves.png")
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 10_000
