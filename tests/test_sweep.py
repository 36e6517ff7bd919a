"""Sweeps: trial expansion from the sweep file, and a real sweep on digits with Ray started locally.

The real sweep has 5 trials: ann and dsr (T=2) x seeds 0, 1, and one `broken` trial whose batch is larger
than the training set (launch raises), run with `retries: 1`. The table checks read the same MLflow store.
Another real sweep runs under a launcher's environment (srun's rank 1 of 2): its trial is still one process.
"""

import statistics
import sys

import pytest
import yaml

from harness.cli import run as cli_run
from harness.recipe import RecipeError
from harness.sweep import SweepError, expand, load_sweep

BASE = {
    "name": "digits_sweep",
    "data": {"dataset": "digits", "batch_size": 128},
    "model": {"backbone": "snn_convnet"},
    "method": {"name": "dsr", "neuron": "if", "T": 2, "vth": {"init": 2.0}},
    "optim": {"name": "sgd", "lr": 0.05, "epochs": 1},
    "track": {"experiment": "sweeps"},
}


def write(path, content) -> str:
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return str(path)


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return write(tmp_path / "base.yaml", BASE)


# ----------------------------------------------------------------------------------------- expansion
def test_variants_grid_and_distributions_expand_in_order(tmp_path, base):
    sweep = write(tmp_path / "s.yaml", {
        "name": "grid", "recipe": "base.yaml", "set": {"optim.epochs": 3},
        "space": {"seed": [0, 1], "optim.lr": {"loguniform": [0.001, 0.1]}},
        "variants": {"ann": {"set": {"method": {"name": "ann"}}},
                     "dsr_lif": {"set": {"method": {"name": "dsr", "neuron": "lif"}},
                                 "space": {"method.T": [1, 4]}}}})
    trials = expand(load_sweep(sweep), sweep)
    assert [t.name.split("-lr=")[0] for t in trials] == [
        "ann-seed=0", "ann-seed=1", "dsr_lif-T=1-seed=0", "dsr_lif-T=1-seed=1", "dsr_lif-T=4-seed=0",
        "dsr_lif-T=4-seed=1"]
    assert [t.recipe.T for t in trials] == [None, None, 1, 1, 4, 4]  # the ANN runs once per seed, not per T
    lif = trials[2].recipe.method
    assert lif.neuron == "lif" and lif.alpha == 0.3 and lif.vth.init == 0.3  # a whole section: LIF defaults
    assert all(t.recipe.optim.epochs == 3 for t in trials)
    lrs = [t.recipe.optim.lr for t in trials]
    assert all(0.001 <= lr <= 0.1 for lr in lrs) and len(set(lrs)) == 6
    assert lrs == [t.recipe.optim.lr for t in expand(load_sweep(sweep), sweep)]  # drawn reproducibly
    only = expand(load_sweep(sweep), sweep, only=("dsr_lif",))
    assert [t.recipe.optim.lr for t in only] == lrs[2:]  # same draws with a variant left out
    assert str(trials[0].recipe.track.tracking_uri) == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_sweep_file_errors_name_the_field(tmp_path, base):
    bad_key = write(tmp_path / "a.yaml", {"name": "a", "recipe": "base.yaml", "spce": {"seed": [0]}})
    with pytest.raises(SweepError, match=r"a\.yaml: spce: Extra inputs are not permitted; allowed: name, recipe"):
        load_sweep(bad_key)
    bad_axis = write(tmp_path / "b.yaml", {"name": "b", "recipe": "base.yaml", "space": {"seed": 3}})
    with pytest.raises(SweepError, match=r"b\.yaml: space\.seed"):
        load_sweep(bad_axis)
    bad_field = write(tmp_path / "c.yaml", {"name": "c", "recipe": "base.yaml", "space": {"optim.lrr": [0.1]}})
    with pytest.raises(RecipeError, match=r"c\.yaml \[trial lrr=0\.1\]: optim\.lrr: unknown key"):
        expand(load_sweep(bad_field), bad_field)
    with pytest.raises(SweepError, match="-o optim.lrr: that key is a sweep axis"):
        expand(load_sweep(bad_field), bad_field, overrides=("optim.lrr=0.2",))
    with pytest.raises(SweepError, match="--only: unknown variant 'x'"):
        expand(load_sweep(bad_field), bad_field, only=("x",))


def test_dry_run_lists_the_trials(tmp_path, base, capsys, monkeypatch):
    sweep = write(tmp_path / "s.yaml", {"name": "d", "recipe": "base.yaml", "space": {"method.T": [1, 2, 4]}})
    monkeypatch.setattr(sys, "argv", ["harness", "sweep", sweep, "--dry-run"])
    cli_run()
    out = capsys.readouterr().out
    assert out.startswith("3 trials") and "T=4" in out and "method.T=2" in out


# ---------------------------------------------------------------------------------------- a real sweep
@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """Run the 5-trial sweep once for the tests below; Ray started here, shut down after."""
    import os

    import ray

    from harness.sweep import run_sweep

    folder = tmp_path_factory.mktemp("sweep")
    cwd = os.getcwd()
    os.chdir(folder)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    write(folder / "base.yaml", {**BASE, "track": {"experiment": "sweeps", "tracking_uri": uri}})
    sweep = write(folder / "sweep.yaml", {
        "name": "digits4", "recipe": "base.yaml", "space": {"seed": [0, 1]},
        "variants": {"ann": {"set": {"method": {"name": "ann"}}},
                     "dsr": {"set": {"method": {"name": "dsr", "neuron": "if", "vth": {"init": 2.0}}},
                             "space": {"method.T": [2]}},
                     "broken": {"set": {"data.batch_size": 5000}, "space": {"seed": [0]}}},
        "resources": {"cpu": 1}, "max_concurrent": 2, "retries": 1})
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        summary = run_sweep(sweep)
    finally:
        ray.shutdown()
        os.chdir(cwd)
    yield summary, uri


def _runs(uri: str, sweep_id: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweeps")
    return client.search_runs([experiment.experiment_id], f"tags.`sweep.id` = '{sweep_id}'")


@pytest.mark.slow
def test_sweep_runs_every_trial_as_one_mlflow_run_under_its_parent(swept):
    summary, uri = swept
    runs = _runs(uri, summary["sweep_id"])
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    assert len(parents) == 1 and parents[0].info.run_id == summary["parent_run_id"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary["parent_run_id"]]
    finished = sorted(r.data.tags["sweep.trial"] for r in children if r.info.status == "FINISHED")
    assert finished == ["ann-seed=0", "ann-seed=1", "dsr-T=2-seed=0", "dsr-T=2-seed=1"]
    assert all(r.data.tags["sweep.name"] == "digits4" for r in children)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    # every evaluation logs the efficiency metrics: spikes drive ACs in dsr only, the backbone's MACs agree
    by_method = {r.data.tags["method"]: r.data.metrics for r in children if r.info.status == "FINISHED"}
    assert by_method["dsr"]["efficiency/sops_per_sample"] > 0 and by_method["ann"]["efficiency/sops_per_sample"] == 0
    assert by_method["dsr"]["efficiency/ann_macs_per_sample"] == by_method["ann"]["efficiency/macs_per_sample"]
    assert 0 < by_method["dsr"]["firing_rate/mean"] < 1


@pytest.mark.slow
def test_failing_trial_is_retried_then_recorded_failed(swept):
    summary, uri = swept
    broken = [r for r in _runs(uri, summary["sweep_id"]) if r.data.tags.get("sweep.trial") == "broken-seed=0"]
    assert sorted(r.data.tags["sweep.attempt"] for r in broken) == ["0", "1"]  # retries: 1
    assert {r.info.status for r in broken} == {"FAILED"}
    assert all("data.batch_size: 5000 is larger than the training set" in r.data.tags["sweep.error"] for r in broken)
    assert summary["status"] == "FAILED" and summary["failed_trials"] == ["broken-seed=0"]
    assert summary["runs"] == {"FINISHED": 4, "FAILED": 2, "KILLED": 0}


def _cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["harness", *args])
    try:
        cli_run()
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_table_cells_equal_the_run_metrics(swept, monkeypatch, capsys):
    summary, uri = swept
    finished = [r for r in _runs(uri, summary["sweep_id"]) if r.info.status == "FINISHED" and "method" in r.data.tags]
    groups: dict[str, list[float]] = {}
    for r in finished:
        groups.setdefault(r.data.tags["method"], []).append(r.data.metrics["test/acc1"])
    code, out, _ = _cli(monkeypatch, capsys, "table", "--experiment", "sweeps", "--sweep", summary["sweep_id"],
                        "--rows", "method,neuron", "--cols", "T", "--metric", "test/acc1", "--tracking-uri", uri)
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0] == "| source | method | neuron | T=2 |"
    cells = {line.split(" | ")[1]: line.split(" | ")[3].rstrip(" |") for line in lines[2:]}
    for method, values in groups.items():
        assert len(values) == 2
        assert cells[method] == f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n=2)"
    code, out, _ = _cli(monkeypatch, capsys, "table", "--experiment", "sweeps", "--sweep", summary["sweep_id"],
                        "--format", "csv", "--tracking-uri", uri)
    rows = {line.split(",")[0]: line.split(",") for line in out.strip().splitlines()[1:]}
    for method, values in groups.items():
        assert float(rows[method][3]) == pytest.approx(statistics.mean(values), abs=1e-9)
        assert float(rows[method][4]) == pytest.approx(statistics.stdev(values), abs=1e-9)
    assert rows["ann"][2] == "none"  # the ANN is a T-independent row


@pytest.mark.slow
def test_table_rejects_unknown_experiment_and_metric(swept, monkeypatch, capsys):
    _summary, uri = swept
    code, _, err = _cli(monkeypatch, capsys, "table", "--experiment", "nope", "--tracking-uri", uri)
    assert code == 2 and "error: experiment 'nope' not found" in err and "sweeps" in err
    code, _, err = _cli(monkeypatch, capsys, "table", "--experiment", "sweeps", "--metric", "test/acc9",
                        "--tracking-uri", uri)
    assert code == 2 and "error: metric 'test/acc9' is in none of the" in err and "test/acc1" in err


@pytest.mark.slow
def test_plot_writes_a_png(swept, monkeypatch, capsys, tmp_path):
    summary, uri = swept
    code, out, _ = _cli(monkeypatch, capsys, "plot", "--experiment", "sweeps", "--sweep", summary["sweep_id"],
                        "--tracking-uri", uri, "--output", str(tmp_path / "p.png"))
    assert code == 0 and (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_trial_is_one_process_under_a_launchers_environment(tmp_path, base, monkeypatch):
    """A Ray worker started under `srun` inherits SLURM_PROCID/SLURM_STEP_NUM_TASKS: the trial must not take
    itself for rank 1 of a 2-process job (no rendezvous, and it logs and trains as rank 0)."""
    from harness.sweep import run_sweep

    for name, value in {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(name, value)  # before Ray starts here: its workers inherit the environment
    sweep = write(tmp_path / "s.yaml", {"name": "srun", "recipe": "base.yaml", "resources": {"cpu": 1}})
    summary = run_sweep(sweep, num_cpus=1)
    runs = _runs(summary["tracking_uri"], summary["sweep_id"])
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary["parent_run_id"]]
    assert summary["status"] == "FINISHED" and summary["runs"] == {"FINISHED": 1, "FAILED": 0, "KILLED": 0}
    assert len(trials) == 1 and trials[0].info.status == "FINISHED" and "test/acc1" in trials[0].data.metrics
