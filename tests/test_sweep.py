"""Sweeps: trial expansion from the sweep file, and a real sweep on digits with Ray started locally.

The real sweep has 5 trials: ann and dsr (T=2) x seeds 0, 1, and one `broken` trial whose batch is larger
than the training set (launch raises), run with `retries: 1`. The table checks read the same MLflow store.
Another real sweep runs under a launcher's environment (srun's rank 1 of 2): its trial is still one process.
Two drills run `harness sweep` as a process of its own: one SIGKILLs a trial's worker process (found by the
trial's `worker.json`) and the trial is retried from its last checkpoint; one SIGTERMs the sweep after its
first trial finished, then `--resume` finishes it without running the finished trial again. Both check that
each trial has exactly one FINISHED run, that no two trials share a run, and that no run is left RUNNING.
"""

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time

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


# ------------------------------------------------------------------- a killed worker, an interrupted sweep
DRILL_EPOCHS = 5


@contextlib.contextmanager
def _sweep_process(folder, *args):
    """`harness sweep ARGS` in `folder` as a process of its own (Ray started there); on the way out one still
    running gets SIGINT, then SIGKILL to its process group (its Ray processes with it)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "RAY_memory_monitor_refresh_ms": "0"}  # other tenants' memory must not make Ray kill our workers
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(folder / f"sweep-{time.monotonic_ns()}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "sweep", *args], cwd=folder, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        proc.log = log.name
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)


def _ended(proc, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"harness sweep still running after {timeout} s; log {proc.log}:\n{_tail(proc.log)}")


def _tail(path, lines: int = 40) -> str:
    return "\n".join(open(path).read().splitlines()[-lines:])


def _worker(folder, trial: str) -> dict:
    """The trial's `worker.json` ({} before its first attempt wrote it)."""
    found = list(folder.glob(f"runs/sweeps/*/{trial}/worker.json"))
    return json.loads(found[0].read_text()) if found else {}


def _checkpointed(proc, folder, trial: str, timeout: float = 300) -> dict:
    """Wait until Tune holds a checkpoint of `trial`'s first epoch at least; return its `worker.json`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker = _worker(folder, trial)
        if (worker.get("tune_checkpoint_epoch") or 0) >= 1:
            return worker
        if proc.poll() is not None:
            pytest.fail(f"harness sweep ended ({proc.returncode}) before {trial} had a checkpoint:\n{_tail(proc.log)}")
        time.sleep(0.05)
    pytest.fail(f"no checkpoint of {trial} within {timeout} s:\n{_tail(proc.log)}")


def _drill(folder, name: str, max_concurrent: int) -> tuple[str, str]:
    """Two trials (seeds 0, 1) of DRILL_EPOCHS epochs, FIFO, one retry; the sweep file and tracking URI."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    write(folder / "base.yaml", {**BASE, "optim": {**BASE["optim"], "epochs": DRILL_EPOCHS},
                                 "track": {"experiment": "sweeps", "tracking_uri": uri}})
    sweep = write(folder / f"{name}.yaml", {
        "name": name, "recipe": "base.yaml", "space": {"seed": [0, 1]}, "scheduler": {"kind": "fifo"},
        "resources": {"cpu": 1}, "max_concurrent": max_concurrent, "retries": 1})
    return sweep, uri


def _sweep_runs(uri: str, folder, name: str) -> tuple[object, dict[str, list]]:
    """The sweep's parent run, and its child runs by trial name; none of them RUNNING (the sweep has ended)."""
    (sweep_id,) = [p.name for p in (folder / "ray_results").glob(f"{name}-*")]
    runs = _runs(uri, sweep_id)
    assert not [r.data.tags.get("sweep.trial", "parent") for r in runs if r.info.status == "RUNNING"]
    (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children: dict[str, list] = {}
    for run in runs:
        if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id:
            children.setdefault(run.data.tags["sweep.trial"], []).append(run)
    assert len(runs) == 1 + sum(len(c) for c in children.values())  # every run of the sweep is parent or child
    return parent, children


def _epochs_logged(uri: str, run_id: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, "test/acc1"))


def _history(uri: str, run_id: str) -> dict[str, list[tuple]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    return {key: sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key))
            for key in run.data.metrics}


def _assert_resumed_once(epochs: list[int], checkpointed: int) -> None:
    """Every epoch logged; those up to the checkpoint the retry resumed from exactly once (not retrained); a
    later one at most twice (finished and logged by the lost attempt before Tune took its checkpoint)."""
    assert sorted(set(epochs)) == list(range(1, DRILL_EPOCHS + 1)), epochs
    assert all(epochs.count(e) == 1 for e in range(1, checkpointed + 1)), epochs
    assert all(epochs.count(e) <= 2 for e in set(epochs)), epochs


@pytest.mark.slow
def test_killed_worker_is_retried_from_its_last_checkpoint(tmp_path):
    """SIGKILL the worker process of one of two concurrent trials once Tune holds its epoch-1 checkpoint: the
    trial is retried, resumes from that checkpoint in the same MLflow run, and the sweep ends FINISHED."""
    sweep, uri = _drill(tmp_path, "kill", max_concurrent=2)
    with _sweep_process(tmp_path, sweep, "--num-cpus", "2") as proc:
        before = _checkpointed(proc, tmp_path, "seed=0")
        os.kill(before["pid"], signal.SIGKILL)
        assert _ended(proc, 300) == 0, _tail(proc.log)
    after = _worker(tmp_path, "seed=0")
    assert after["attempt"] == 1 and after["pid"] != before["pid"]
    assert after["resumed_at_epoch"] >= before["tune_checkpoint_epoch"] >= 1
    assert list(tmp_path.glob("runs/sweeps/*/seed=0/digits_sweep/restored-*/last.pt"))
    parent, children = _sweep_runs(uri, tmp_path, "kill")
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.runs_finished"] == "2"
    assert sorted(children) == ["seed=0", "seed=1"]
    assert all(len(runs) == 1 and runs[0].info.status == "FINISHED" for runs in children.values())
    (killed,), (other,) = children["seed=0"], children["seed=1"]
    assert killed.info.run_id == after["resumed_run_id"] != other.info.run_id  # the same run continued
    assert killed.data.tags["resumed"] == "true" and killed.data.tags["sweep.attempt"] == "1"
    assert "resumed" not in other.data.tags and _worker(tmp_path, "seed=1")["attempt"] == 0
    _assert_resumed_once(_epochs_logged(uri, killed.info.run_id), after["resumed_at_epoch"])
    assert _epochs_logged(uri, other.info.run_id) == list(range(1, DRILL_EPOCHS + 1))


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    """SIGTERM `harness sweep` while its second trial (one at a time) trains, the first one FINISHED: the parent
    ends KILLED, nothing RUNNING; `--resume` continues the second trial's run from its checkpoint and leaves
    the first one alone (same run, same metric history, no new attempt)."""
    sweep, uri = _drill(tmp_path, "intr", max_concurrent=1)
    with _sweep_process(tmp_path, sweep, "--num-cpus", "2") as proc:
        cut = _checkpointed(proc, tmp_path, "seed=1")
        proc.send_signal(signal.SIGTERM)
        assert _ended(proc, 120) == 130, _tail(proc.log)
    assert "interrupted; continue with: harness sweep" in open(proc.log).read()
    parent, children = _sweep_runs(uri, tmp_path, "intr")
    assert parent.info.status == "KILLED" and parent.data.tags["sweep.runs_killed"] == "1"
    (finished,), (interrupted,) = children["seed=0"], children["seed=1"]
    assert finished.info.status == "FINISHED"
    assert interrupted.info.status == "KILLED" and interrupted.data.tags["sweep.stopped"] == "interrupted"
    finished_history, finished_worker = _history(uri, finished.info.run_id), _worker(tmp_path, "seed=0")
    assert finished_worker["attempt"] == 0

    with _sweep_process(tmp_path, sweep, "--num-cpus", "2", "--resume") as proc:
        assert _ended(proc, 300) == 0, _tail(proc.log)
    resumed_parent, children = _sweep_runs(uri, tmp_path, "intr")
    assert resumed_parent.info.run_id == parent.info.run_id and resumed_parent.info.status == "FINISHED"
    assert {k: resumed_parent.data.tags[f"sweep.runs_{k}"] for k in ("finished", "failed", "killed")} == {
        "finished": "2", "failed": "0", "killed": "0"}
    assert all(len(runs) == 1 and runs[0].info.status == "FINISHED" for runs in children.values())
    (kept,), (continued,) = children["seed=0"], children["seed=1"]
    assert kept.info.run_id == finished.info.run_id and kept.info.end_time == finished.info.end_time
    assert _history(uri, kept.info.run_id) == finished_history and _worker(tmp_path, "seed=0") == finished_worker
    assert kept.data.tags["sweep.attempt"] == "0" and "resumed" not in kept.data.tags
    worker = _worker(tmp_path, "seed=1")
    assert continued.info.run_id == interrupted.info.run_id == worker["resumed_run_id"]
    assert continued.data.tags["resumed"] == "true" and worker["attempt"] == 1
    assert worker["resumed_at_epoch"] >= cut["tune_checkpoint_epoch"] >= 1
    _assert_resumed_once(_epochs_logged(uri, continued.info.run_id), worker["resumed_at_epoch"])
