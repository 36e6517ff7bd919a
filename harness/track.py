"""MLflow run lifecycle: one run per launch, never left RUNNING (DESIGN.md "What flows through the house").

Tracking URI: `recipe.track.tracking_uri`, else `MLFLOW_TRACKING_URI`, else `sqlite:///<cwd>/mlflow.db`
(an embedded store, no server). With the sqlite default, artifacts go to `<cwd>/mlartifacts/`.
A run logs the flattened recipe as params, tags (method, neuron, T, backbone, dataset, recipe name and
`track.tags`), per-epoch metrics, the resolved recipe and a summary as artifacts. Leaving the `Tracker`
context ends the run FINISHED, KILLED (KeyboardInterrupt, SIGTERM) or FAILED (any other exception).
A resumed launch reopens the run its checkpoint names, so one training run stays one MLflow run.
Every write here holds SIGINT and SIGTERM back until it is done: a signal handled in the middle of
a sqlite write surfaces as an `MlflowException` and could leave the run RUNNING (seen when torchrun tears
a failed job down while rank 0 is ending its run FAILED). The first signal held back is delivered right
after the write, or dropped when the run is being ended by an exception anyway.

Besides `Tracker`, small functions by tracking URI for the runs other modules handle: a sweep's parent run
and its trials' runs (`create_run`, `log_text`, `set_tags`, `reopen_run`, `end_run`), and the search the
sweep driver, its trials and the report make (`find_runs`, as plain `RunRecord`s; `experiment_names`).
This is the only module that talks to MLflow.
"""

import json
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from harness.recipe import Recipe, flatten, recipe_to_yaml

DEFAULT_DB = "mlflow.db"
MLFLOW_PARAM_LIMIT = 6000  # characters MLflow accepts in one param value


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
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name).as_uri()
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
def _signals_held(deliver: bool = True) -> Iterator[None]:
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


@_signals_held()
def create_run(uri: str, experiment: str, run_name: str, tags: dict[str, str]) -> str:
    """A new RUNNING run in `experiment` (created if needed); its id."""
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, experiment, uri)
    return client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id


@_signals_held()
def log_text(uri: str, run_id: str, text: str, name: str) -> None:
    """Store `text` as the run's artifact file `name`."""
    _log_text(MlflowClient(uri), run_id, text, name)


@_signals_held()
def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    MlflowClient(uri).log_batch(run_id, tags=[mlflow.entities.RunTag(k, v) for k, v in tags.items()])


@_signals_held()
def reopen_run(uri: str, run_id: str) -> None:
    """Mark an ended run RUNNING again (a resumed sweep's parent)."""
    MlflowClient(uri).update_run(run_id, status="RUNNING")


@_signals_held()
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


def run_tags(recipe: Recipe) -> dict[str, str]:
    method = recipe.method
    tags = {
        "recipe": recipe.name,
        "method": method.name,
        "neuron": getattr(method, "neuron", "none"),
        "T": str(recipe.T) if recipe.T is not None else "none",
        "backbone": recipe.model.backbone,
        "dataset": recipe.data.dataset,
        "seed": str(recipe.seed),
    }
    tags.update(recipe.track.tags)
    return tags


class Tracker:
    """Context manager around one MLflow run. `enabled=False` (non-zero ranks) makes every call a no-op.

    Args:
        recipe: the resolved recipe.
        resume_run_id: reopen this run (from a checkpoint) instead of starting a new one.
        enabled: log at all (only rank 0 logs in a distributed run).
        parent_run_id: nest the run under this one (sweeps).
    """

    def __init__(self, recipe: Recipe, resume_run_id: str | None = None, enabled: bool = True,
                 parent_run_id: str | None = None):
        self.recipe = recipe
        self.enabled = enabled
        self.uri = tracking_uri(recipe)
        self.resume_run_id = resume_run_id
        self.parent_run_id = parent_run_id
        self.run_id: str | None = None
        self.client: MlflowClient | None = None

    def __enter__(self) -> "Tracker":
        if not self.enabled:
            return self
        with _signals_held():
            return self._open()

    def _open(self) -> "Tracker":
        self.client = MlflowClient(self.uri)
        experiment_id = ensure_experiment(self.client, self.recipe.track.experiment, self.uri)
        if self.resume_run_id and self._run_exists(self.resume_run_id):
            self.run_id = self.resume_run_id
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, "resumed", "true")
            return self
        tags = run_tags(self.recipe)
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(experiment_id, run_name=self.recipe.track.run_name or self.recipe.name,
                                     tags=tags)
        self.run_id = run.info.run_id
        params = [mlflow.entities.Param(k, str(v)[:MLFLOW_PARAM_LIMIT]) for k, v in flatten(self.recipe).items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.log_text(recipe_to_yaml(self.recipe), "recipe.yaml")
        return self

    def _run_exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except mlflow.exceptions.MlflowException:
            return False

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or not metrics:
            return
        now = int(time.time() * 1000)
        entries = [mlflow.entities.Metric(k, float(v), now, step) for k, v in metrics.items()]
        with _signals_held():
            for start in range(0, len(entries), 500):
                self.client.log_batch(self.run_id, metrics=entries[start:start + 500])

    def log_text(self, text: str, name: str) -> None:
        if self.enabled:
            with _signals_held():
                _log_text(self.client, self.run_id, text, name)

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.log_text(json.dumps(summary, indent=2, sort_keys=True), "summary.json")

    def set_tag(self, key: str, value: str) -> None:
        if self.enabled:
            with _signals_held():
                self.client.set_tag(self.run_id, key, value)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.enabled or self.run_id is None:
            return False
        if exc_type is None:
            status = RunStatus.FINISHED
        elif issubclass(exc_type, KeyboardInterrupt) or (issubclass(exc_type, SystemExit) and exc.code == 143):
            status = RunStatus.KILLED
        else:
            status = RunStatus.FAILED
        with _signals_held(deliver=exc_type is None):  # an exception already ends this process
            self.client.set_terminated(self.run_id, status=RunStatus.to_string(status))
        return False
