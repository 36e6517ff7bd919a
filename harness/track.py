"""MLflow run lifecycle: one run per launch, never left RUNNING (DESIGN.md "What flows through the house").

Tracking URI: `recipe.track.tracking_uri`, else `MLFLOW_TRACKING_URI`, else `sqlite:///<cwd>/mlflow.db`
(an embedded store, no server). With the sqlite default, artifacts go to `<cwd>/mlartifacts/`.
A run logs the flattened recipe as params, tags (method, neuron, T, backbone, dataset, recipe name and
`track.tags`), per-epoch metrics, the resolved recipe and a summary as artifacts. Leaving the `Tracker`
context ends the run FINISHED, KILLED (KeyboardInterrupt, SIGTERM) or FAILED (any other exception).
A resumed launch reopens the run its checkpoint names, so one training run stays one MLflow run.
"""

import json
import os
import tempfile
import time
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
        for start in range(0, len(entries), 500):
            self.client.log_batch(self.run_id, metrics=entries[start:start + 500])

    def log_text(self, text: str, name: str) -> None:
        if not self.enabled:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(text)
            self.client.log_artifact(self.run_id, str(path))

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.log_text(json.dumps(summary, indent=2, sort_keys=True), "summary.json")

    def set_tag(self, key: str, value: str) -> None:
        if self.enabled:
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
        self.client.set_terminated(self.run_id, status=RunStatus.to_string(status))
        return False
