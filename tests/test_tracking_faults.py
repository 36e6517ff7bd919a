"""Tracking faults: a tracking store that cannot be used fails a launch in seconds, before anything is built;
a server that goes away during a run does not stop it (entries wait in memory, then go out when it is back,
or are kept in the run folder and replayed with `harness track-replay`).

Fast tests use a real sqlite store and make MLflow's writes fail as an unreachable server makes them fail;
slow ones start a real `mlflow server` and a real `harness launch` and kill the server in the middle."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from clusters import MlflowServer
from mlflow.tracking import MlflowClient

from harness import track
from harness.cli import main
from harness.engine.distributed import free_port
from harness.recipe import load_recipe
from harness.track import REQUEST_TIMEOUT_S, UNSENT_FILE, Tracker, TrackingUnreachable

RECIPE = """
name: digits_outage
seed: 3
data: {{dataset: digits, batch_size: 128}}
model: {{backbone: snn_convnet}}
method: {{name: dsr, neuron: if, T: 2, vth: {{init: 2.0}}}}
optim: {{name: sgd, lr: 0.05, epochs: {epochs}, warmup_iters: 5}}
track: {{experiment: tests, tracking_uri: "{uri}", output_dir: "{tmp}/runs"}}
"""


def make_recipe(tmp_path: Path, uri: str, epochs: int = 2) -> Path:
    path = tmp_path / "outage.yaml"
    path.write_text(RECIPE.format(epochs=epochs, uri=uri, tmp=tmp_path))
    return path


# ---------------------------------------------------------------- fail fast at the start

def test_a_closed_port_fails_the_check_at_once_naming_the_uri():
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.perf_counter()
    with pytest.raises(TrackingUnreachable, match=rf"cannot reach the tracking server {uri} \(connection refused\)"):
        track.check_reachable(uri)
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize("answer", ["never connects", "never answers"])
def test_a_black_holed_server_fails_the_check_within_the_request_timeout(answer):
    """A listener whose queue is full drops new connections (as a black-holed address does); one that
    accepts and never answers stands for a hung server."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    if answer == "never connects":  # fill the accept queue, so the kernel drops the next SYNs
        for _ in range(2):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
            fillers.append(filler)
        time.sleep(0.2)
    uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        start = time.perf_counter()
        with pytest.raises(TrackingUnreachable, match=rf"{uri} \(no answer within {REQUEST_TIMEOUT_S} s\)"):
            track.check_reachable(uri)
        assert time.perf_counter() - start < REQUEST_TIMEOUT_S + 3
    finally:
        for sock in [*fillers, listener]:
            sock.close()


def test_a_sqlite_store_in_a_missing_folder_fails_the_check(tmp_path):
    uri = f"sqlite:///{tmp_path}/missing/mlflow.db"
    with pytest.raises(TrackingUnreachable, match=f"folder {tmp_path}/missing does not exist"):
        track.check_reachable(uri)
    track.check_reachable(f"sqlite:///{tmp_path}/mlflow.db")


# ---------------------------------------------------------------- an outage during a run (sqlite, writes made to fail)

def refused() -> mlflow.exceptions.MlflowException:
    """What MLflow raises when its server refuses the connection."""
    error = mlflow.exceptions.MlflowException("API request to http://127.0.0.1:9/api/2.0/mlflow/runs/log-batch "
                                              "failed with exception ConnectionError")
    error.__cause__ = ConnectionRefusedError(111, "Connection refused")
    return error


class Outage:
    """While `down`, the writes a run makes fail as they do against a server that went away."""

    def __init__(self, monkeypatch):
        self.down = False
        self.tries = 0
        for method in ("log_batch", "log_artifact", "set_terminated"):
            monkeypatch.setattr(MlflowClient, method, self._failing(getattr(MlflowClient, method)))

    def _failing(self, real):
        def write(client, *args, **kwargs):
            if self.down:
                self.tries += 1
                raise refused()
            return real(client, *args, **kwargs)
        return write


@pytest.fixture
def sqlite_recipe(tmp_path):
    return load_recipe(make_recipe(tmp_path, f"sqlite:///{tmp_path}/mlflow.db"))


def history(uri: str, run_id: str, key: str = "test/acc1") -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


def test_metrics_logged_while_the_server_is_away_go_out_in_order_when_it_returns(tmp_path, monkeypatch,
                                                                                sqlite_recipe):
    uri, run_dir = sqlite_recipe.track.tracking_uri, tmp_path / "run"
    outage = Outage(monkeypatch)
    with Tracker(sqlite_recipe, run_dir=run_dir) as tracker:
        tracker.log_metrics({"test/acc1": 10.0, "train/loss": 2.0}, step=1)
        outage.down = True
        tracker.log_metrics({"test/acc1": 20.0, "train/loss": 1.5}, step=2)  # neither raises nor blocks
        tracker.set_tag("phase", "outage")
        tracker.log_metrics({"test/acc1": 30.0, "train/loss": 1.0}, step=3)
        assert outage.tries == 3 and tracker.outbox.metrics() == 4  # one failed try per write
        outage.down = False
        tracker.log_metrics({"test/acc1": 40.0, "train/loss": 0.5}, step=4)
        assert not tracker.outbox.entries
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["phase"] == "outage"
    assert history(uri, tracker.run_id) == [(1, 10.0), (2, 20.0), (3, 30.0), (4, 40.0)]
    assert tracker.note == f"all metrics reached the tracking server {uri} (4 written after an outage)"
    assert not (run_dir / UNSENT_FILE).exists()


def test_no_outage_no_note(tmp_path, sqlite_recipe):
    with Tracker(sqlite_recipe, run_dir=tmp_path / "run") as tracker:
        tracker.log_metrics({"test/acc1": 10.0}, step=1)
    assert tracker.note is None


def test_what_never_went_out_is_kept_in_the_run_folder_and_replayed(tmp_path, monkeypatch, sqlite_recipe):
    uri, run_dir = sqlite_recipe.track.tracking_uri, tmp_path / "run"
    outage = Outage(monkeypatch)
    with Tracker(sqlite_recipe, run_dir=run_dir) as tracker:
        tracker.log_metrics({"test/acc1": 10.0}, step=1)
        outage.down = True
        tracker.log_metrics({"test/acc1": 20.0}, step=2)
        tracker.log_summary({"final_test_acc1": 20.0})
    unsent = run_dir / UNSENT_FILE
    lines = [json.loads(line) for line in unsent.read_text().splitlines()]
    assert lines[0] == {"kind": "run", "tracking_uri": uri, "run_id": tracker.run_id}
    assert [(e["kind"], e.get("step")) for e in lines[1:]] == [("metric", 2), ("text", None), ("end", None)]
    assert lines[-1]["status"] == "FINISHED"
    assert tracker.note == (f"the tracking server {uri} was unreachable at the end of the run (connection refused); "
                            f"1 metrics and the run's end (FINISHED) are kept in {unsent}; replay them with: "
                            f"harness track-replay {run_dir}")
    assert MlflowClient(uri).get_run(tracker.run_id).info.status == "RUNNING"

    outage.down = False
    result = CliRunner().invoke(main, ["track-replay", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"replayed 1 metrics (2 entries) to MLflow run {tracker.run_id}")
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert history(uri, tracker.run_id) == [(1, 10.0), (2, 20.0)]
    assert "summary.json" in {a.path for a in MlflowClient(uri).list_artifacts(tracker.run_id)}
    assert not unsent.exists()


def test_a_replay_while_the_server_is_still_away_keeps_the_file(tmp_path, monkeypatch, sqlite_recipe):
    run_dir = tmp_path / "run"
    outage = Outage(monkeypatch)
    with Tracker(sqlite_recipe, run_dir=run_dir):
        outage.down = True
    before = (run_dir / UNSENT_FILE).read_text()
    with pytest.raises(TrackingUnreachable, match="connection refused"):
        track.replay_unsent(run_dir)
    assert (run_dir / UNSENT_FILE).read_text() == before
    with pytest.raises(track.HarnessError, match="nothing to replay"):
        track.replay_unsent(tmp_path)


def test_a_resumed_launch_sends_what_its_run_kept_first(tmp_path, monkeypatch, sqlite_recipe):
    uri, run_dir = sqlite_recipe.track.tracking_uri, tmp_path / "run"
    outage = Outage(monkeypatch)
    with pytest.raises(KeyboardInterrupt), Tracker(sqlite_recipe, run_dir=run_dir) as first:
        first.log_metrics({"test/acc1": 10.0}, step=1)
        outage.down = True
        first.log_metrics({"test/acc1": 20.0}, step=2)
        raise KeyboardInterrupt
    assert json.loads((run_dir / UNSENT_FILE).read_text().splitlines()[-1]) == {"kind": "end", "status": "KILLED"}
    outage.down = False
    with Tracker(sqlite_recipe, resume_run_id=first.run_id, run_dir=run_dir) as resumed:
        resumed.log_metrics({"test/acc1": 30.0}, step=3)
    assert resumed.run_id == first.run_id
    assert history(uri, first.run_id) == [(1, 10.0), (2, 20.0), (3, 30.0)]
    assert MlflowClient(uri).get_run(first.run_id).info.status == "FINISHED"
    assert not (run_dir / UNSENT_FILE).exists()


def test_an_error_the_server_answers_still_raises(tmp_path, monkeypatch, sqlite_recipe):
    with pytest.raises(mlflow.exceptions.MlflowException, match="refused by the server"), \
            Tracker(sqlite_recipe, run_dir=tmp_path / "run") as tracker:
        def rejected(*_args, **_kwargs):
            raise mlflow.exceptions.MlflowException("refused by the server", error_code="INVALID_PARAMETER_VALUE")
        monkeypatch.setattr(MlflowClient, "log_batch", rejected)
        tracker.log_metrics({"test/acc1": 10.0}, step=1)


class TornDown(RuntimeError):
    pass


def test_a_signal_during_a_failed_write_is_still_delivered_after_it(tmp_path, monkeypatch, sqlite_recipe):
    def torn_down(_signum, _frame):
        raise TornDown()

    def signalled_then_refused(*_args, **_kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise refused()

    previous = signal.signal(signal.SIGTERM, torn_down)
    try:
        with Tracker(sqlite_recipe, run_dir=tmp_path / "run") as tracker:
            real = MlflowClient.log_batch
            monkeypatch.setattr(MlflowClient, "log_batch", signalled_then_refused)
            with pytest.raises(TornDown):
                tracker.log_metrics({"test/acc1": 10.0}, step=1)
            assert tracker.outbox.metrics() == 1  # kept for the next write
            monkeypatch.setattr(MlflowClient, "log_batch", real)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert history(sqlite_recipe.track.tracking_uri, tracker.run_id) == [(1, 10.0)]


# ---------------------------------------------------------------- real server, real launch

class Launch:
    """`harness launch RECIPE` in a process of its own; its output lines are collected as they come."""

    def __init__(self, args: list[str], cwd: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *args], cwd=cwd,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, text: str, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None or self.reader.is_alive(), "".join(self.lines)
            assert time.monotonic() < deadline, f"no {text!r} within {timeout_s} s:\n" + "".join(self.lines)
            time.sleep(0.1)

    def finish(self, timeout_s: float = 300) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout_s)
        self.reader.join(timeout=10)
        return code, "".join(self.lines)

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL ends a stopped process too
            self.proc.wait(timeout=30)


@pytest.mark.slow
def test_an_unreachable_server_at_the_start_fails_the_launch_in_seconds(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "harness.cli", "launch", str(make_recipe(tmp_path, uri))],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"error: {tmp_path}/outage.yaml: cannot reach the tracking server {uri} "
                                        "(connection refused); start it or fix track.tracking_uri (or "
                                        "MLFLOW_TRACKING_URI)"]
    assert seconds < 15, f"took {seconds:.1f} s"
    assert not (tmp_path / "runs").exists()  # nothing built, nothing written


def _epochs_on_server(uri: str, run_id: str) -> list[int]:
    return [step for step, _ in history(uri, run_id)]


def _run_id(uri: str) -> str:
    (run,) = track.find_runs(uri, "tests")
    return run.run_id


@pytest.mark.slow
@pytest.mark.parametrize("server_returns", [True, False], ids=["server-returns", "server-never-returns"])
def test_a_server_that_goes_away_mid_run_does_not_stop_training(tmp_path, server_returns):
    """Epoch 1 reaches the server; it is killed (its whole process group); epochs 2 and 3 are logged while
    it is away. The trainer is paused (SIGSTOP) at the points where the test acts, so nothing races."""
    epochs = 4
    server = MlflowServer(tmp_path / "server", free_port())
    launch = None
    try:
        server.start()
        launch = Launch(["launch", str(make_recipe(tmp_path, server.uri, epochs))], tmp_path)
        launch.wait_for(f"epoch 1/{epochs}")
        launch.proc.send_signal(signal.SIGSTOP)
        run_id = _run_id(server.uri)
        assert _epochs_on_server(server.uri, run_id) == [1]
        per_epoch = len(MlflowClient(server.uri).get_run(run_id).data.metrics)
        server.kill()
        launch.proc.send_signal(signal.SIGCONT)
        if server_returns:
            launch.wait_for(f"epoch 3/{epochs}")
            launch.proc.send_signal(signal.SIGSTOP)
            server.start()
            launch.proc.send_signal(signal.SIGCONT)
        code, output = launch.finish()
        assert code == 0, output
        run_dir = next((tmp_path / "runs" / "digits_outage").iterdir())
        if server_returns:
            assert (f"all metrics reached the tracking server {server.uri} ({2 * per_epoch} written after an "
                    "outage)") in output
            assert not (run_dir / UNSENT_FILE).exists()
        else:
            unsent = run_dir / UNSENT_FILE
            assert (f"the tracking server {server.uri} was unreachable at the end of the run (connection refused); "
                    f"{(epochs - 1) * per_epoch} metrics and the run's end (FINISHED) are kept in {unsent}; replay "
                    f"them with: harness track-replay {run_dir}") in output
            entries = [json.loads(line) for line in unsent.read_text().splitlines()]
            assert sorted({e["step"] for e in entries if e["kind"] == "metric"}) == list(range(2, epochs + 1))
            assert entries[-1] == {"kind": "end", "status": "FINISHED"}
            server.start()
            replay = subprocess.run([sys.executable, "-m", "harness.cli", "track-replay", str(run_dir)],
                                    cwd=tmp_path, capture_output=True, text=True, timeout=120)
            assert replay.returncode == 0, replay.stderr
            assert f"replayed {(epochs - 1) * per_epoch} metrics" in replay.stdout
            assert not unsent.exists()
        run = MlflowClient(server.uri).get_run(run_id)
        assert run.info.status == "FINISHED"
        assert _epochs_on_server(server.uri, run_id) == list(range(1, epochs + 1))
        assert len(run.data.metrics) == per_epoch
        assert {"recipe.yaml", "summary.json"} <= {a.path for a in MlflowClient(server.uri).list_artifacts(run_id)}
    finally:
        if launch is not None:
            launch.end()
        server.kill()


OPEN_TOGETHER = """
import sys, time
from harness import track
from harness.recipe import load_recipe
uri, start = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))  # every process opens the new store at the same moment
recipe = load_recipe(sys.argv[3])
with track.Tracker(recipe) as tracker:
    tracker.log_metrics({"x": 1.0}, step=1)
"""


@pytest.mark.slow
def test_processes_started_together_on_a_new_sqlite_store_all_open_it(tmp_path):
    """`harness launch ... &` once per seed on a new sqlite file: every process creates or checks the schema on
    opening, and without the folder lock the `Tracker` takes, all but one failed with `sqlite3.OperationalError:
    duplicate column name: step` (2 of 3 processes, measured)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: together\ntrack: {{experiment: together, tracking_uri: '{uri}'}}\n")
    start = time.time() + 8  # after every interpreter has imported mlflow
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_TOGETHER, uri, str(start), str(recipe)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], "\n".join(o[-2000:] for o in outputs)
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("together").experiment_id])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
