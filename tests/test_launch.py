"""`harness launch` end to end on the embedded digits: MLflow runs, checkpoints, exact resume, and runs
that end by crash or interrupt (never left RUNNING). MLflow is a real sqlite store in tmp_path."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from harness import track
from harness.engine import checkpoint
from harness.engine.launch import launch
from harness.engine.loop import Trainer
from harness.recipe import load_recipe
from harness.track import Tracker

RECIPE = """
name: digits_{method}
seed: 3
data: {{dataset: digits, batch_size: 128}}
model: {{backbone: snn_convnet}}
method: {method_section}
optim: {{name: sgd, lr: 0.05, epochs: {epochs}, warmup_iters: 5}}
track: {{experiment: tests, tracking_uri: "sqlite:///{tmp}/mlflow.db", output_dir: "{tmp}/runs"}}
"""
METHODS = {"dsr": "{name: dsr, neuron: if, T: 2, vth: {init: 2.0}}", "ann": "{name: ann}",
           "lif": "{name: dsr, neuron: lif, T: 2, dt: 0.1, vth: {init: 0.5}}"}


def make_recipe(tmp_path, method="dsr", epochs=2):
    path = tmp_path / f"{method}.yaml"
    path.write_text(RECIPE.format(method=method, method_section=METHODS[method], epochs=epochs, tmp=tmp_path))
    return path


def runs(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("tests")
    return client, client.search_runs([experiment.experiment_id]) if experiment else []


@pytest.mark.parametrize("method", ["dsr", "lif", "ann"])
@pytest.mark.slow
def test_launch_logs_one_finished_run_with_params_tags_metrics_artifacts(tmp_path, monkeypatch, method):
    monkeypatch.chdir(tmp_path)
    path = make_recipe(tmp_path, method)
    recipe = load_recipe(path)
    summary = launch(recipe, echo=lambda *_: None)
    client, found = runs(tmp_path)
    assert len(found) == 1
    run = found[0]
    assert run.info.status == "FINISHED" and run.info.run_id == summary["mlflow_run_id"]
    assert run.data.params["optim.lr"] == "0.05" and run.data.params["data.dataset"] == "digits"
    spiking = method != "ann"
    neuron = {"dsr": "if", "lif": "lif", "ann": "none"}[method]
    expected_tags = {"method": "dsr" if spiking else "ann", "neuron": neuron, "T": "2" if spiking else "none",
                     "backbone": "snn_convnet", "dataset": "digits"}
    assert expected_tags.items() <= run.data.tags.items()
    history = client.get_metric_history(run.info.run_id, "test/acc1")
    assert [m.step for m in history] == [1, 2]
    assert history[-1].value == pytest.approx(summary["final_test_acc1"])
    assert "test/acc5" in run.data.metrics  # 10 classes > 5
    rates = {k: v for k, v in run.data.metrics.items() if k.startswith("firing_rate/")}
    thresholds = {k for k in run.data.metrics if k.startswith("vth/")}
    if spiking:
        assert len(rates) == 3 + 1 and all(0 <= v <= 1 for v in rates.values())  # 3 layers + mean
        assert len(thresholds) == 3
    else:
        assert not rates and not thresholds
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe.yaml", "summary.json"} <= artifacts
    state = checkpoint.load(summary["run_dir"] + "/last.pt")
    assert state["epoch"] == 2 and state["recipe"]["name"] == f"digits_{method}"
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "step", "mlflow_run_id"} <= state.keys()
    assert (tmp_path / "runs" / f"digits_{method}").is_dir()


class Interrupt(KeyboardInterrupt):
    pass


@pytest.mark.slow
def test_resume_ends_with_exactly_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = make_recipe(tmp_path, "dsr", epochs=3)
    straight = launch(load_recipe(path), echo=lambda *_: None)

    real_save = checkpoint.Checkpointer.save

    def save_then_stop(self, engine, counters, *args, **kwargs):
        real_save(self, engine, counters, *args, **kwargs)
        if counters["epoch"] == 2:
            raise Interrupt()

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_stop)
    with pytest.raises(Interrupt):
        launch(load_recipe(path), echo=lambda *_: None)
    monkeypatch.setattr(checkpoint.Checkpointer, "save", real_save)
    client, found = runs(tmp_path)
    killed = [r for r in found if r.info.status == "KILLED"]
    assert len(killed) == 1
    resumed = launch(load_recipe(path), resume="latest", echo=lambda *_: None)

    assert resumed["mlflow_run_id"] == killed[0].info.run_id  # one training run, one MLflow run
    assert client.get_run(resumed["mlflow_run_id"]).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(resumed["mlflow_run_id"], "test/acc1")]
    assert steps == [1, 2, 3]
    a = checkpoint.load(straight["run_dir"] + "/last.pt")["model"]
    b = checkpoint.load(resumed["run_dir"] + "/last.pt")["model"]
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ after resume: {different[:5]}"


@pytest.mark.slow
def test_crash_marks_run_failed_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = make_recipe(tmp_path, "dsr", epochs=3)
    real_train_epoch = Trainer.train_epoch

    def crash_in_second_epoch(self, progress, stop=None):
        if self.epoch == 1:
            raise RuntimeError("disk on fire")
        return real_train_epoch(self, progress, stop)

    monkeypatch.setattr(Trainer, "train_epoch", crash_in_second_epoch)
    with pytest.raises(RuntimeError, match="disk on fire"):
        launch(load_recipe(path), echo=lambda *_: None)
    _, found = runs(tmp_path)
    assert [r.info.status for r in found] == ["FAILED"]
    (last,) = (tmp_path / "runs").glob("digits_dsr/*/last.pt")
    assert checkpoint.load(last)["epoch"] == 1


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    checkpoint.save_atomic({"epoch": 1, "w": torch.ones(3)}, target)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("no space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoint.save_atomic({"epoch": 2, "w": torch.zeros(3)}, target)
    assert checkpoint.load(target)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


@pytest.mark.parametrize("signum,status,code", [(signal.SIGINT, "KILLED", 130)])  # SIGTERM: test_faults.py
@pytest.mark.slow
def test_ctrl_c_marks_the_run_killed(tmp_path, signum, status, code):
    path = make_recipe(tmp_path, "dsr", epochs=500)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "launch", str(path)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "runs").glob("*/*/last.pt")):
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.2)
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == code
    _, found = runs(tmp_path)
    assert [r.info.status for r in found] == [status]


class TornDown(RuntimeError):
    pass


@pytest.fixture
def sigterm_raises():
    """SIGTERM handled as a distributed process handles it (an exception), restored afterwards."""
    def torn_down(_signum, _frame):
        raise TornDown()

    previous = signal.signal(signal.SIGTERM, torn_down)
    yield
    signal.signal(signal.SIGTERM, previous)


def _signal_in_the_middle(monkeypatch, method: str):
    """Make `MlflowClient.<method>` receive SIGTERM just before it writes."""
    real = getattr(MlflowClient, method)

    def signalled(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, method, signalled)


def test_a_signal_while_the_run_is_being_ended_still_ends_it(tmp_path, monkeypatch, sigterm_raises):
    """torchrun's SIGTERM reaching rank 0 while it ends its run FAILED must not leave the run RUNNING."""
    recipe = load_recipe(make_recipe(tmp_path))
    _signal_in_the_middle(monkeypatch, "set_terminated")
    with pytest.raises(ValueError, match="the crash"), Tracker(recipe):
        raise ValueError("the crash")
    _, found = runs(tmp_path)
    assert [r.info.status for r in found] == ["FAILED"]


def test_a_signal_during_a_metric_write_is_delivered_after_it(tmp_path, monkeypatch, sigterm_raises):
    recipe = load_recipe(make_recipe(tmp_path))
    with pytest.raises(TornDown), Tracker(recipe) as tracker:
        _signal_in_the_middle(monkeypatch, "log_batch")
        tracker.log_metrics({"test/acc1": 50.0}, step=1)
    client, found = runs(tmp_path)
    assert [r.info.status for r in found] == ["FAILED"]  # TornDown is not an interrupt: the run failed
    assert [m.value for m in client.get_metric_history(found[0].info.run_id, "test/acc1")] == [50.0]


def test_a_signal_while_a_sweep_run_is_being_ended_is_delivered_after_it(tmp_path, monkeypatch, sigterm_raises):
    """The by-URI writes (a sweep's parent and trial runs) hold signals as the `Tracker`'s do."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = track.create_run(uri, "tests", "parent", {})
    _signal_in_the_middle(monkeypatch, "set_terminated")
    with pytest.raises(TornDown):
        track.end_run(uri, run_id, "KILLED")
    _, found = runs(tmp_path)
    assert [r.info.status for r in found] == ["KILLED"]
