"""`harness launch`: recipe -> run folder -> trainer -> MLflow run -> summary.

Everything that can be wrong with the input (recipe, data root, backbone, resume checkpoint) is found
before the MLflow run starts, so a rejected launch writes nothing to MLflow. Run folders are
`<track.output_dir>/<name>/<YYYYmmdd-HHMMSS>/`; `--resume` without a folder takes the newest one of
this recipe name that holds a `last.pt`.

Several processes (torchrun, SLURM, MPI: `distributed.detect_process`) join one process group, rank 0
alone picks the run folder (and resolves `--resume`) and broadcasts it, every rank loads the checkpoint
(so `output_dir` must be on a file system all nodes share), and rank 0 alone tracks, so a job on several
nodes must name a tracking server: a sqlite or file URI is refused in one line before any process waits
(`track.check_shared`). The job fails as a
whole: an error on rank 0 before training is raised on every rank; a process that dies fails the
others' next collective at once (a hung one after `engine.timeout_s`), and the launcher (torchrun) then
ends the rest with SIGTERM. During training a first SIGTERM (or SIGUSR1) is a stop request
(`preemption.py`): every process checkpoints at the next step boundary and exits 75, the MLflow run ends
KILLED; a second SIGTERM ends the process at once (one process: KILLED, 143; distributed: an error, the
run ends FAILED), as does a collective with a dead process. Checkpoints are atomic and checksummed: the
last complete one survives any kill. A DeepSpeed run in one process gets a one-process group of its own
on 127.0.0.1.
"""

import json
import math
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.engine import checkpoint, distributed
from harness.engine.build import pick_device
from harness.engine.distributed import ProcessInfo
from harness.engine.engines import check_job
from harness.engine.loop import Trainer
from harness.engine.preemption import PREEMPTED_EXIT_CODE, Preempted, StopRequest
from harness.errors import HarnessError
from harness.recipe import Recipe, RecipeError, recipe_to_yaml
from harness.track import Tracker, check_shared, tracking_uri


class JobTornDown(RuntimeError):
    """The launcher ended this process of a distributed job (SIGTERM): another process failed, or the job
    was cancelled."""

# Fields that may change between a checkpoint and the recipe that resumes it.
RESUMABLE_CHANGES = ("engine", "track", "efficiency", "data.workers", "data.root", "data.loader", "data.train",
                     "data.val", "data.eval_batch_size", "optim.epochs", "optim.skip_nonfinite",
                     "optim.max_skips_in_a_row")


def _comparable(recipe_dict: dict) -> dict:
    out = json.loads(json.dumps(recipe_dict))
    for dotted in RESUMABLE_CHANGES:
        *parents, leaf = dotted.split(".")
        node = out
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return out


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in _differences(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)]
    return [] if a == b else [f"{prefix} (checkpoint {a!r}, recipe {b!r})"]


def find_resume_dir(recipe: Recipe, resume: str) -> Path:
    if resume != "latest":
        path = Path(resume)
        return path.parent if path.is_file() else path
    base = Path(recipe.track.output_dir) / recipe.name
    candidates = sorted(p.parent for p in base.glob(f"*/{checkpoint.LAST}"))
    if not candidates:
        raise RecipeError(f"--resume: no {checkpoint.LAST} under {base}/ to resume; pass a run folder")
    return candidates[-1]


def check_resumable(state: dict, recipe: Recipe, ckpt_path: Path) -> None:
    if "recipe" not in state or "model" not in state or "optimizer" not in state:
        raise RecipeError("not a training checkpoint of harness launch (no recipe/optimizer state)", file=ckpt_path)
    diffs = _differences(_comparable(state["recipe"]), _comparable(recipe.model_dump(mode="json")))
    if diffs:
        raise RecipeError(f"--resume: checkpoint was written by another recipe; differs from this recipe "
                          f"in {diffs[0]}" + (f" and {len(diffs) - 1} more field(s)" if len(diffs) > 1 else "")
                          + f"; only {', '.join(RESUMABLE_CHANGES)} may change", file=ckpt_path)


def prepare_run(recipe: Recipe, resume: str | None) -> tuple[Path, dict | None]:
    """The run folder and, when resuming, the checkpoint state (validated against the recipe). First of all,
    an unreachable tracking store fails the launch (`track.check_reachable`), before anything is built."""
    Tracker.check(recipe)
    if resume is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(recipe.track.output_dir) / recipe.name / stamp
        suffix = 1
        while run_dir.exists():
            run_dir = Path(recipe.track.output_dir) / recipe.name / f"{stamp}-{suffix}"
            suffix += 1
        return run_dir, None
    run_dir = find_resume_dir(recipe, resume)
    ckpt_path = run_dir / checkpoint.LAST
    state = checkpoint.load(ckpt_path)
    check_resumable(state, recipe, ckpt_path)
    if state.get("deepspeed"):  # DeepSpeed's own files, checked before DeepSpeed unpickles them
        checkpoint.verify_files(state["deepspeed"].get("files", {}), run_dir / state["deepspeed"]["folder"])
    return run_dir, state


def agree_on_run(recipe: Recipe, resume: str | None, process: ProcessInfo) -> tuple[Path, dict | None]:
    """`prepare_run` on rank 0, its folder broadcast to every rank, which loads the same checkpoint; a
    `HarnessError` on rank 0 is raised on every rank."""
    if not process.distributed:
        return prepare_run(recipe, resume)
    outcome: dict[str, str | None] = {"run_dir": None, "error": None, "file": None}
    if process.is_main:
        try:
            run_dir, state = prepare_run(recipe, resume)
            outcome["run_dir"] = str(run_dir)
        except HarnessError as e:
            outcome.update(error=e.message, file=e.file)
            distributed.broadcast_object(outcome, process)
            raise
    outcome = distributed.broadcast_object(outcome, process)
    if outcome["error"] is not None:
        raise RecipeError(outcome["error"], file=outcome["file"])
    run_dir = Path(outcome["run_dir"])
    if not process.is_main:
        try:
            state = checkpoint.load(run_dir / checkpoint.LAST) if resume is not None else None
        except checkpoint.CheckpointError as e:
            raise RecipeError(f"--resume on rank {process.rank}: {e.message} (track.output_dir must be on a file "
                              "system every node shares)", file=e.file) from None
    return run_dir, state


def _torn_down(signum, _frame):
    raise JobTornDown(f"signal {signum} from the launcher: the job is being torn down (another process failed "
                      "or the job was cancelled)")


@contextmanager
def process_group(recipe: Recipe, process: ProcessInfo) -> Iterator[None]:
    """Joined to the job's process group while inside (none for a one-process run that is not DeepSpeed)."""
    if not process.distributed and recipe.engine.kind != "deepspeed":
        yield
        return
    distributed.init_process_group(process, recipe.engine, pick_device(recipe.engine, process))
    previous = signal.signal(signal.SIGTERM, _torn_down) if process.distributed else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        distributed.teardown()


def launch(recipe: Recipe, resume: str | None = None, process: ProcessInfo | None = None, echo=print,
           on_epoch_end=None, parent_run_id: str | None = None) -> dict[str, Any]:
    """Train `recipe` to the end; return the summary. Errors about the recipe do not name its file: the
    caller that read it does (`harness.errors.in_file`).

    `process` defaults to what the environment says (`distributed.detect_process`).
    `on_epoch_end(epoch, metrics)` is handed to `Trainer.fit`; `parent_run_id` nests the MLflow run."""
    process = process or distributed.detect_process()
    check_job(recipe.engine, recipe.data.batch_size, process)  # before waiting for the other processes
    check_shared(tracking_uri(recipe), process.nodes, f"this {process.launcher} job")
    with process_group(recipe, process):
        return _train(recipe, resume, process, echo, on_epoch_end, parent_run_id)


def summarize(trainer: Trainer, history: list[dict[str, float]], wall_time_s: float,
              tracker: Tracker) -> dict[str, Any]:
    """The run's summary: what `summary.json` holds and `harness launch` prints."""
    final, split = (history[-1] if history else {}), trainer.recipe.data.eval_split
    return {
        "recipe": trainer.recipe.name, "epochs": trainer.epoch, "eval_split": split,
        f"final_{split}_acc1": final.get(f"{split}/acc1", math.nan), f"best_{split}_acc1": trainer.best_acc1,
        f"final_{split}_acc5": final.get(f"{split}/acc5"), "firing_rate_mean": final.get("firing_rate/mean"),
        "wall_time_s": wall_time_s, "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "run_dir": str(trainer.run_dir), "mlflow_run_id": tracker.run_id,
        "tracking_uri": tracking_uri(trainer.recipe), "experiment": trainer.recipe.track.experiment,
    }


def _train(recipe: Recipe, resume: str | None, process: ProcessInfo, echo, on_epoch_end,
           parent_run_id: str | None) -> dict[str, Any]:
    run_dir, state = agree_on_run(recipe, resume, process)
    trainer = Trainer(recipe, run_dir, resume=state, process=process)
    if process.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
        where = "new run" if not state else f"resuming after epoch {trainer.epoch}"
        if state and trainer.epoch_step:  # the same 1-based epoch the stop message named
            where = f"resuming in epoch {trainer.epoch + 1} at step {trainer.epoch_step} of {trainer.iters_per_epoch}"
        procs = f" x {process.world_size} processes ({recipe.engine.kind})" if process.distributed else ""
        echo(f"{recipe.name}: {where} in {run_dir}; {trainer.iters_per_epoch} steps/epoch on "
             f"{trainer.context.device}{procs}")
        echo(f"data: {trainer.data.note}")
    resume_run_id = state.get("mlflow_run_id") if state else None
    with Tracker(recipe, resume_run_id=resume_run_id, enabled=process.is_main,
                 parent_run_id=parent_run_id, run_dir=run_dir) as tracker:
        start = time.perf_counter()
        try:
            with StopRequest() as stop:
                history = trainer.fit(tracker, on_epoch_end=on_epoch_end, stop=stop)
        except Preempted as stopped:
            if process.is_main:
                echo(f"{stopped.message}; continue with: harness launch <recipe> --resume {run_dir} "
                     f"(exit status {PREEMPTED_EXIT_CODE})")
            raise
        summary = summarize(trainer, history, time.perf_counter() - start, tracker)
        tracker.log_summary(summary)
    if process.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        split = summary["eval_split"]
        echo(f"final {split} acc1 {summary[f'final_{split}_acc1']:.2f}% (best {summary[f'best_{split}_acc1']:.2f}%) "
             f"after {summary['epochs']} epochs in {summary['wall_time_s']:.1f} s")
        echo(f"MLflow run {summary['mlflow_run_id']} in experiment '{recipe.track.experiment}' at "
             f"{summary['tracking_uri']}  (see it: mlflow ui --backend-store-uri {summary['tracking_uri']})")
        if tracker.note:  # the tracking server went away during the run
            echo(tracker.note)
        echo(f"checkpoints: {run_dir}")
    return summary
