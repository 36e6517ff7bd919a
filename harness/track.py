"""MLflow run lifecycle: one run per launch, never left RUNNING (DESIGN.md "What flows through the house").

Tracking URI: `recipe.track.tracking_uri`, else `MLFLOW_TRACKING_URI`, else `sqlite:///<cwd>/mlflow.db`
(an embedded store, no server). With the sqlite default, artifacts go to `<cwd>/mlartifacts/`.
A run logs the flattened recipe as params, tags (method, neuron, T, readout, backbone, dataset, recipe name and
`track.tags`), per-epoch metrics, the resolved recipe and a summary as artifacts. Leaving the `Tracker`
context ends the run FINISHED, KILLED (KeyboardInterrupt, SystemExit: SIGTERM, a preemption stop) or FAILED
(any other exception).
A resumed launch reopens the run its checkpoint names, so one training run stays one MLflow run.
Every write here holds SIGINT and SIGTERM back until it is done: a signal handled in the middle of
a sqlite write surfaces as an `MlflowException` and could leave the run RUNNING (seen when torchrun tears
a failed job down while rank 0 is ending its run FAILED). The first signal held back is delivered right
after the write, or dropped when the run is being ended by an exception anyway.

Tracking faults. `check_reachable` fails a launch (or sweep) before anything is built when the store cannot
be used: an HTTP server that does not answer one request within `REQUEST_TIMEOUT_S`, a sqlite file whose
folder is missing or read-only (`TrackingUnreachable`, one line naming the URI). The `Tracker`'s own HTTP
requests make one try of at most `REQUEST_TIMEOUT_S` (not MLflow's default ~4 minutes of retries). A
server that goes away during training does not stop it: what the `Tracker` logs (metrics, tags, texts)
waits in memory, in order, and goes out with the next write that gets through; what has still not gone
out when the run ends is kept, with the status the run should end with, in `<run_dir>/tracking-unsent.jsonl`
(`replay_unsent` sends it, `harness track-replay RUN_DIR`; a resumed launch of that run sends it first).
`Tracker.note` says which happened. An answer that is an error (the server refused a write) still raises.

Besides `Tracker`, small functions by tracking URI for the runs other modules handle: a sweep's parent run
and its trials' runs (`create_run`, `log_text`, `set_tags`, `delete_tags`, `reopen_run`, `end_run`), and the search the
sweep driver, its trials and the report make (`find_runs`, as plain `RunRecord`s; `experiment_names`).
This is the only module that talks to MLflow.
"""

import fcntl
import json
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import requests
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from harness.errors import HarnessError
from harness.recipe import Recipe, flatten, recipe_to_yaml

DEFAULT_DB = "mlflow.db"
MLFLOW_PARAM_LIMIT = 6000  # characters MLflow accepts in one param value
UNSENT_FILE = "tracking-unsent.jsonl"
REQUEST_TIMEOUT_S = 5  # one HTTP request of the Tracker (connect, then read) gives up after this long
BATCH = 500  # entries per log_batch request


def tracking_uri(recipe: Recipe | None = None) -> str:
    if recipe is not None and recipe.track.tracking_uri:
        return recipe.track.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def ensure_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """The id of experiment `name`, created if needed (artifacts beside a local sqlite store)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


@dataclass(frozen=True)
class RunRecord:
    """A run as `find_runs` returns it; `status` is RUNNING, FINISHED, FAILED or KILLED, `metrics` the last
    logged values."""

    run_id: str
    status: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]


@contextmanager
def signals_held(deliver: bool = True) -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (main thread only; elsewhere signals cannot arrive)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {signum: signal.signal(signum, lambda caught, _frame: held.append(caught))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    if held and deliver:
        signal.raise_signal(held[0])


class TrackingUnreachable(HarnessError):
    """The tracking store cannot be used: a server that does not answer, a sqlite folder that is missing."""


def _unreachable_message(uri: str, reason: str) -> str:
    return (f"cannot reach the tracking server {uri} ({reason}); start it or fix track.tracking_uri "
            "(or MLFLOW_TRACKING_URI)")


QUICK_REQUESTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT_S)}


@contextmanager
def _quick_requests() -> Iterator[None]:
    """MLflow's HTTP requests inside make one try of at most `REQUEST_TIMEOUT_S` for connecting and as long
    for the answer. MLflow reads these variables at every request (`mlflow.utils.rest_utils.http_request`),
    so setting them for the block is enough; the process's environment is changed meanwhile (a thread
    that starts an MLflow request during the block gets the short values too)."""
    previous = {name: os.environ.get(name) for name in QUICK_REQUESTS}
    os.environ.update(QUICK_REQUESTS)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _no_answer(error: BaseException) -> str | None:
    """Why a request to the tracking server got no answer ("connection refused", ...), or None when the
    server answered (and the error is its answer) or there is no server (a sqlite store)."""
    reason = None
    while error is not None:
        if isinstance(error, (requests.exceptions.Timeout, TimeoutError)):
            return f"no answer within {REQUEST_TIMEOUT_S} s"
        if isinstance(error, ConnectionRefusedError):
            return "connection refused"
        if isinstance(error, socket.gaierror):
            return "unknown host"
        if isinstance(error, requests.exceptions.RetryError) or (
                isinstance(error, requests.exceptions.HTTPError) and error.response is not None
                and error.response.status_code >= 500):
            return "it answers with server errors"
        if isinstance(error, requests.exceptions.HTTPError):
            return None
        if isinstance(error, requests.exceptions.RequestException):
            reason = reason or type(error).__name__
        error = error.__cause__ or error.__context__
    return reason


def check_reachable(uri: str) -> None:
    """Raise `TrackingUnreachable` unless the tracking store at `uri` can be used, within
    `REQUEST_TIMEOUT_S` plus a little: an http(s) server must answer one cheap request (a search for one
    experiment); a sqlite file's folder must exist and be writable. Other stores are not checked."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise TrackingUnreachable(f"tracking URI {uri}: folder {folder} does not exist; create it or fix "
                                      "track.tracking_uri (or MLFLOW_TRACKING_URI)")
        if not os.access(folder, os.W_OK):
            raise TrackingUnreachable(f"tracking URI {uri}: folder {folder} is not writable")
        return
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with _quick_requests():
            MlflowClient(uri).search_experiments(max_results=1)
    except (mlflow.exceptions.MlflowException, requests.exceptions.RequestException) as error:
        reason = _no_answer(error)
        if reason is None:
            raise TrackingUnreachable(f"tracking URI {uri}: the server answers, but not as an MLflow tracking "
                                      f"server ({_first_line(error)}); fix track.tracking_uri (or "
                                      "MLFLOW_TRACKING_URI)") from None
        raise TrackingUnreachable(_unreachable_message(uri, reason)) from None


def is_machine_local(uri: str) -> bool:
    """True for a store that lives in files of this machine (sqlite, a local folder), which processes on
    other machines cannot reach; a server (http, https, databricks, a database URL) is shared."""
    scheme = urlparse(uri).scheme
    return scheme in ("file", "sqlite") or (scheme == "" and not uri.startswith("databricks"))  # "" : a path


def check_shared(uri: str, nodes: int, what: str) -> None:
    """Raise `TrackingUnreachable` if `what` spans `nodes` > 1 machines but the store at `uri` is a file of
    this one (`is_machine_local`): the other machines would each write a file of their own, and a resume or a
    trial placed on another node would not find the run."""
    if nodes > 1 and is_machine_local(uri):
        raise TrackingUnreachable(f"tracking URI {uri} is a file on this machine, but {what} spans {nodes} nodes, "
                                  "which cannot share it; run `mlflow server --backend-store-uri sqlite:///mlflow.db "
                                  "--host 0.0.0.0 --port 5000` where every node reaches it and set "
                                  "MLFLOW_TRACKING_URI=http://<that host>:5000 (or track.tracking_uri)")


@contextmanager
def sqlite_store_lock(uri: str) -> Iterator[None]:
    """While inside, hold an exclusive lock on the folder of a sqlite store (nothing for other stores). Opening
    a store creates or upgrades its schema, and processes started together on a new file (`harness launch ...
    &` once per seed) raced on it (seen: `sqlite3.OperationalError: duplicate column name: step`)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    descriptor = os.open(Path(uri.removeprefix("sqlite:///")).parent, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__


@signals_held()
def create_run(uri: str, experiment: str, run_name: str, tags: dict[str, str]) -> str:
    """A new RUNNING run in `experiment` (created if needed); its id."""
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, experiment, uri)
    return client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id


@signals_held()
def log_text(uri: str, run_id: str, text: str, name: str) -> None:
    """Store `text` as the run's artifact file `name`."""
    _log_text(MlflowClient(uri), run_id, text, name)


@signals_held()
def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    MlflowClient(uri).log_batch(run_id, tags=[mlflow.entities.RunTag(k, v) for k, v in tags.items()])


@signals_held()
def delete_tags(uri: str, run_id: str, keys: list[str]) -> None:
    """Remove these tags from the run, those it has (a resumed trial's `sweep.stopped`, `sweep.error`)."""
    client = MlflowClient(uri)
    present = client.get_run(run_id).data.tags
    for key in keys:
        if key in present:
            client.delete_tag(run_id, key)


@signals_held()
def reopen_run(uri: str, run_id: str) -> None:
    """Mark an ended run RUNNING again (a resumed sweep's parent)."""
    MlflowClient(uri).update_run(run_id, status="RUNNING")


@signals_held()
def end_run(uri: str, run_id: str, status: str) -> None:
    """End the run FINISHED, FAILED or KILLED."""
    MlflowClient(uri).set_terminated(run_id, status=status)


def find_runs(uri: str, experiment: str, tags: dict[str, str] | None = None,
              status: str | None = None) -> list[RunRecord]:
    """Every run of `experiment` that has all of `tags` (and `status`, if given); none if there is no such
    experiment."""
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    clauses = [f"tags.`{key}` = '{value}'" for key, value in (tags or {}).items()]
    if status:
        clauses.append(f"attributes.status = '{status}'")
    records, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], " and ".join(clauses), max_results=1000, page_token=token)
        records += [RunRecord(run.info.run_id, run.info.status, run.data.tags, run.data.params, run.data.metrics)
                    for run in page]
        token = page.token
        if not token:
            return records


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """`(step, value)` of every value of metric `key` the run logged (the epoch is the step), in step order."""
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def experiment_names(uri: str) -> list[str]:
    client, names, token = MlflowClient(uri), [], None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        names += [experiment.name for experiment in page]
        token = page.token
        if not token:
            return names


def _log_text(client: MlflowClient, run_id: str, text: str, name: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_text(text)
        client.log_artifact(run_id, str(path))


def readout(method) -> str:
    """How a run's logits are read out: `spikes` (an output neuron's spike representation) or `analog` (the
    last layer's output, time-averaged in an SNN; the ANN's and QCFS's logits are analog, as is QCFS's
    converted SNN, whose output layer has no neuron)."""
    return getattr(method, "readout", "analog")


def run_tags(recipe: Recipe) -> dict[str, str]:
    method = recipe.method
    tags = {
        "recipe": recipe.name,
        "method": method.name,
        "neuron": getattr(method, "neuron", "none"),
        "T": str(recipe.T) if recipe.T is not None else "none",
        "readout": readout(method),
        "backbone": recipe.model.backbone,
        "dataset": recipe.data.dataset,
        "seed": str(recipe.seed),
    }
    tags.update(recipe.track.tags)
    return tags


class _Outbox:
    """What is logged to one run (metric, tag and text entries, plain dicts) and has not reached the
    tracking server yet, sent oldest first in batches. `deliver` stops at the first request that gets no
    answer and keeps the rest; an answer that is an error raises. `late` counts the metrics that reached
    the server after a failed try, `failure` says why the last try failed (None once one got through)."""

    def __init__(self, client: MlflowClient, run_id: str, entries: list[dict] | None = None):
        self.client = client
        self.run_id = run_id
        self.entries: list[dict] = entries or []
        self.late = 0
        self.failure: str | None = None
        self.failed_tries = 0
        self._held = 0  # metrics at the front of `entries` that a failed try left there

    def deliver(self, end_status: str | None = None) -> bool:
        """Send every entry (then end the run with `end_status`, if given); False when the server could not
        be reached, the entries not sent still held."""
        try:
            with _quick_requests():
                while self.entries:
                    self._send_next()
                if end_status is not None:
                    self.client.set_terminated(self.run_id, status=end_status)
        except (mlflow.exceptions.MlflowException, requests.exceptions.RequestException) as error:
            self.failure = _no_answer(error)
            if self.failure is None:
                raise
            self.failed_tries += 1
            self._held = self.metrics()
            return False
        self.failure = None
        return True

    def metrics(self) -> int:
        return sum(entry["kind"] == "metric" for entry in self.entries)

    def _send_next(self) -> None:
        first = self.entries[0]
        chunk = list(takewhile(lambda entry: entry["kind"] == first["kind"], self.entries[:BATCH]))
        if first["kind"] == "text":
            chunk = chunk[:1]
            _log_text(self.client, self.run_id, first["text"], first["name"])
        elif first["kind"] == "tag":
            self.client.log_batch(self.run_id, tags=[mlflow.entities.RunTag(e["key"], e["value"]) for e in chunk])
        else:
            self.client.log_batch(self.run_id, metrics=[mlflow.entities.Metric(e["key"], e["value"], e["timestamp"],
                                                                               e["step"]) for e in chunk])
            late = min(self._held, len(chunk))
            self._held -= late
            self.late += late
        del self.entries[:len(chunk)]


def _write_unsent(path: Path, uri: str, run_id: str, entries: list[dict], status: str) -> None:
    """`path` (atomically): a header naming the server and run, one JSON object per entry, then the status."""
    lines = [{"kind": "run", "tracking_uri": uri, "run_id": run_id}, *entries, {"kind": "end", "status": status}]
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(json.dumps(line) + "\n" for line in lines))
    os.replace(temporary, path)


def _read_unsent(path: Path) -> tuple[dict, list[dict], str]:
    """The header, the entries and the end status `_write_unsent` wrote."""
    header, *entries, end = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return header, entries, end["status"]


def replay_unsent(run_dir: str | Path) -> dict[str, Any]:
    """Send what a run could not send (`<run_dir>/tracking-unsent.jsonl`) to the tracking server it names,
    end the run with the status the file holds, and remove the file. What a new outage leaves unsent stays
    in the file (`TrackingUnreachable`). Returns the tracking URI, run id, metrics sent and status."""
    path = Path(run_dir) / UNSENT_FILE
    if not path.is_file():
        raise HarnessError(f"no {UNSENT_FILE} in {run_dir}: nothing to replay")
    header, entries, status = _read_unsent(path)
    uri, run_id = header["tracking_uri"], header["run_id"]
    check_reachable(uri)
    outbox = _Outbox(MlflowClient(uri), run_id, entries)
    counts = {"metrics": outbox.metrics(), "entries": len(entries)}  # before `deliver` takes them out
    with signals_held():
        try:
            delivered = outbox.deliver(end_status=status)
        except mlflow.exceptions.MlflowException as error:
            raise HarnessError(f"{uri} refused the replay to run {run_id}: {_first_line(error)}", file=path) from None
        if not delivered:
            _write_unsent(path, uri, run_id, outbox.entries, status)
            raise TrackingUnreachable(_unreachable_message(uri, outbox.failure) + f"; {outbox.metrics()} metrics "
                                      f"still kept in {path}")
        path.unlink()
    return {"tracking_uri": uri, "run_id": run_id, **counts, "status": status}


class Tracker:
    """Context manager around one MLflow run. `enabled=False` (non-zero ranks) makes every call a no-op.

    Logging never waits long on the tracking server nor fails for want of it: entries the server cannot
    take wait in memory and go out with the next write; leaving the context sends what is left and ends the
    run, or keeps both in `<run_dir>/tracking-unsent.jsonl`. `note` then says which (None: no outage).
    Opening the run needs the server: `TrackingUnreachable` if it does not answer.

    Args:
        recipe: the resolved recipe.
        resume_run_id: reopen this run (from a checkpoint) instead of starting a new one; what a previous
            launch of it left in `<run_dir>/tracking-unsent.jsonl` is sent first.
        enabled: log at all (only rank 0 logs in a distributed run).
        parent_run_id: nest the run under this one (sweeps).
        run_dir: the run folder, where unsent entries are kept; default `<track.output_dir>/<name>`.
    """

    def __init__(self, recipe: Recipe, resume_run_id: str | None = None, enabled: bool = True,
                 parent_run_id: str | None = None, run_dir: str | Path | None = None):
        self.recipe = recipe
        self.enabled = enabled
        self.uri = tracking_uri(recipe)
        self.resume_run_id = resume_run_id
        self.parent_run_id = parent_run_id
        self.unsent_path = Path(run_dir or Path(recipe.track.output_dir) / recipe.name) / UNSENT_FILE
        self.run_id: str | None = None
        self.client: MlflowClient | None = None
        self.outbox: _Outbox | None = None
        self.note: str | None = None
        self._resumed_unsent = False  # the unsent file in the run folder is this run's, from a previous launch

    @staticmethod
    def check(recipe: Recipe) -> None:
        """`check_reachable` for the recipe's tracking URI: call it before building anything."""
        check_reachable(tracking_uri(recipe))

    def __enter__(self) -> "Tracker":
        if not self.enabled:
            return self
        with signals_held(), _quick_requests():
            try:
                return self._open()
            except mlflow.exceptions.MlflowException as error:
                reason = _no_answer(error)
                if reason is None:
                    raise
                raise TrackingUnreachable(_unreachable_message(self.uri, reason)) from None

    def _open(self) -> "Tracker":
        with sqlite_store_lock(self.uri):  # the first opening of a new store creates its schema
            self.client = MlflowClient(self.uri)
            experiment_id = ensure_experiment(self.client, self.recipe.track.experiment, self.uri)
        if self.resume_run_id and self._run_exists(self.resume_run_id):
            self.run_id = self.resume_run_id
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, "resumed", "true")
            self.outbox = _Outbox(self.client, self.run_id, self._left_unsent())
            self.outbox.deliver()
            return self
        tags = run_tags(self.recipe)
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(experiment_id, run_name=self.recipe.track.run_name or self.recipe.name,
                                     tags=tags)
        self.run_id = run.info.run_id
        self.outbox = _Outbox(self.client, self.run_id)
        params = [mlflow.entities.Param(k, str(v)[:MLFLOW_PARAM_LIMIT]) for k, v in flatten(self.recipe).items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.log_text(recipe_to_yaml(self.recipe), "recipe.yaml")
        return self

    def _run_exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except mlflow.exceptions.MlflowException as error:
            if _no_answer(error) is not None:
                raise
            return False

    def _left_unsent(self) -> list[dict]:
        """The entries a previous launch of this run kept in the run folder, if any."""
        if not self.unsent_path.is_file():
            return []
        header, entries, _status = _read_unsent(self.unsent_path)
        self._resumed_unsent = header["run_id"] == self.run_id
        return entries if self._resumed_unsent else []

    def _log(self, entries: list[dict]) -> None:
        self.outbox.entries += entries
        with signals_held():
            self.outbox.deliver()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or not metrics:
            return
        now = int(time.time() * 1000)
        self._log([{"kind": "metric", "key": k, "value": float(v), "timestamp": now, "step": step}
                   for k, v in metrics.items()])

    def log_text(self, text: str, name: str) -> None:
        if self.enabled:
            self._log([{"kind": "text", "name": name, "text": text}])

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.log_text(json.dumps(summary, indent=2, sort_keys=True), "summary.json")

    def set_tag(self, key: str, value: str) -> None:
        if self.enabled:
            self._log([{"kind": "tag", "key": key, "value": str(value)}])

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.enabled or self.run_id is None:
            return False
        if exc_type is None:
            status = RunStatus.FINISHED
        elif issubclass(exc_type, (KeyboardInterrupt, SystemExit)):  # Ctrl-C, SIGTERM (143), preempted (75)
            status = RunStatus.KILLED
        else:
            status = RunStatus.FAILED
        with signals_held(deliver=exc_type is None):  # an exception already ends this process
            self._settle(RunStatus.to_string(status))
        return False

    def _settle(self, status: str) -> None:
        """End the run on the server after what is left, or keep both in the run folder; set `note`."""
        outbox = self.outbox
        if outbox.deliver(end_status=status):
            if self._resumed_unsent:
                self.unsent_path.unlink(missing_ok=True)
            if outbox.failed_tries:
                self.note = (f"all metrics reached the tracking server {self.uri} ({outbox.late} written after "
                             "an outage)")
            return
        _write_unsent(self.unsent_path, self.uri, self.run_id, outbox.entries, status)
        self.note = (f"the tracking server {self.uri} was unreachable at the end of the run ({outbox.failure}); "
                     f"{outbox.metrics()} metrics and the run's end ({status}) are kept in {self.unsent_path}; "
                     f"replay them with: harness track-replay {self.unsent_path.parent}")
