"""The `harness` command: one function per verb (DESIGN.md). Bad input: one line on stderr, exit 2."""

import os
import signal
import sys
import time

import click

from harness.errors import HarnessError


def _terminate(signum, _frame):
    raise SystemExit(128 + signum)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """dsr-harness: train SNNs with DSR and compare them with their baselines."""


@main.command()
@click.argument("recipe", type=click.Path())  # a folder: read_yaml says so, naming it
@click.option("-o", "--override", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a recipe field, e.g. -o optim.lr=0.05 (repeatable).")
@click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[RUN_DIR]",
              help="Continue from a run folder's last.pt; alone: the newest run of this recipe.")
@click.option("--dry-run", is_flag=True, help="Print the resolved recipe and exit.")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Start N processes on this machine (torchrun); engine.kind must be ddp or deepspeed.")
def launch(recipe: str, overrides: tuple[str, ...], resume: str | None, dry_run: bool, nproc: int | None) -> None:
    """Train the model a RECIPE (YAML) describes. Under torchrun, SLURM (srun) or MPI, join that job."""
    from harness.errors import in_file
    from harness.recipe import RecipeError, load_recipe, recipe_to_yaml

    resolved = load_recipe(recipe, overrides)
    if dry_run:
        click.echo(recipe_to_yaml(resolved), nl=False)
        return
    from harness.track import Tracker

    with in_file(recipe):  # an unreachable tracking server: one line in seconds, before the heavy imports
        Tracker.check(resolved)
    if nproc is not None and nproc > 1:
        from harness.engine.distributed import ProcessInfo, detect_process
        from harness.engine.engines import check_job

        if detect_process().distributed:
            raise RecipeError("--nproc: this process is already one of a distributed job; drop --nproc")
        if resolved.engine.kind == "single":
            raise RecipeError(f"engine.kind: single runs one process; use -o engine.kind=ddp (or deepspeed) with "
                              f"--nproc {nproc}", file=recipe)
        with in_file(recipe):  # before starting processes that would each say it
            check_job(resolved.engine, resolved.data.batch_size, ProcessInfo(0, nproc, 0, "torchrun"))
        args = ["launch", recipe, *(f"--override={o}" for o in overrides)]
        args += [f"--resume={resume}"] if resume is not None else []
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        sys.stdout.flush()
        os.execv(sys.executable, [*torchrun, "-m", "harness.cli", *args])
    from harness.engine.launch import launch as run_launch

    with in_file(recipe):
        run_launch(resolved, resume=resume, echo=click.echo)


FFCV_DATASETS = ("cifar10", "cifar100", "imagenet", "dvs_cifar10")


@main.group()
def data() -> None:
    """Prepare data sets (FFCV .beton files)."""


@data.command("write-ffcv")
@click.option("--dataset", required=True, help=f"One of {', '.join(FFCV_DATASETS)}.")
@click.option("--root", required=True, type=click.Path(), help="The data set's folder in its standard layout.")
@click.option("--split", required=True, type=click.Choice(["train", "val"]))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The .beton file to write.")
@click.option("--max-res", type=click.IntRange(min=1), default=None, help="Longest stored image side (ImageNet).")
@click.option("--jpeg-quality", type=click.IntRange(1, 100), default=90, show_default=True)
@click.option("--write-mode", type=click.Choice(["raw", "jpg", "smart", "proportion"]), default=None,
              help="FFCV image storage; default raw for CIFAR, jpg for ImageNet.")
@click.option("--frames", type=click.IntRange(min=1), default=20, show_default=True,
              help="T, frames per DVS sample (must equal the recipe's method.T).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Writer processes.")
def write_ffcv(dataset: str, root: str, split: str, out: str, max_res: int | None, jpeg_quality: int,
               write_mode: str | None, frames: int, workers: int) -> None:
    """Write one split of a data set to an FFCV .beton file (atomically: temp file, then rename)."""
    from harness.data.pipeline import ffcv_import_error
    from harness.data.registry import DataError

    if dataset not in FFCV_DATASETS:
        raise DataError(f"--dataset: unknown dataset {dataset!r} for FFCV; allowed: {', '.join(FFCV_DATASETS)}")
    missing = ffcv_import_error()
    if missing:
        raise DataError(f"data write-ffcv: ffcv does not import ({missing}); install the ffcv extra")
    from harness.data.ffcv import write_beton

    start = time.perf_counter()
    count = write_beton(dataset, root, split, out, max_resolution=max_res, jpeg_quality=jpeg_quality,
                        write_mode=write_mode, workers=workers, frames=frames)
    click.echo(f"wrote {count} {dataset} {split} samples to {out} in {time.perf_counter() - start:.1f} s")


@main.group()
def bench() -> None:
    """Measure the harness's parts on this machine."""


@bench.command("loader")
@click.option("--dataset", required=True)
@click.option("--loader", "kind", required=True, type=click.Choice(["ffcv", "torch"]))
@click.option("--root", type=click.Path(), default=None, help="Data set folder (loader torch).")
@click.option("--beton", type=click.Path(dir_okay=False), default=None, help=".beton file of the split (loader ffcv).")
@click.option("--split", type=click.Choice(["train", "val"]), default="train", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="torch: worker processes; ffcv: decoding threads.")
@click.option("--augment/--no-augment", default=True, show_default=True, help="Training augmentations (train split).")
@click.option("--frames", type=click.IntRange(min=1), default=None, help="T of DVS samples.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True, help="Untimed batches first.")
@click.option("--batches", type=click.IntRange(min=1), default=50, show_default=True, help="Timed batches.")
@click.option("--out-dir", type=click.Path(file_okay=False), default="results/bench", show_default=True)
def bench_loader(dataset: str, kind: str, root: str | None, beton: str | None, split: str, batch_size: int,
                 workers: int, augment: bool, frames: int | None, warmup: int, batches: int, out_dir: str) -> None:
    """Images/s of one split's loader at steady state (after warm-up); the result is saved as JSON."""
    from harness.data.throughput import measure_loader, open_loader, write_result

    loader = open_loader(dataset, kind, split, root, beton, batch_size, workers, augment and split == "train",
                         frames)
    result = measure_loader(loader, warmup, batches)
    result.update(dataset=dataset, loader=kind, split=split, batch_size=batch_size, workers=workers,
                  augment=augment and split == "train", warmup=warmup, source=beton or root)
    path = write_result(result, out_dir)
    click.echo(f"{dataset} {split} via {kind}: {result['images_per_s']:,.0f} images/s "
               f"({result['samples']} samples in {result['seconds']:.2f} s after {warmup} warm-up batches); {path}")


def _positive_ints(text: str, option: str) -> list[int]:
    """Comma-separated integers >= 1, or one line naming `option`."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise click.BadParameter(f"expected comma-separated integers >= 1, got {text!r}", param_hint=option)
    return values


def _names(text: str, option: str, what: str, allowed: list[str]) -> list[str]:
    """Comma-separated names, each one of `allowed` (`what`s), or one line naming `option`."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in allowed]
    if unknown or not names:
        raise click.BadParameter(f"unknown {what} {unknown[0]!r}; one of {', '.join(allowed)}"
                                 if unknown else f"name at least one of {', '.join(allowed)}", param_hint=option)
    return names


def _check_device(device: str) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise click.BadParameter("torch sees no CUDA device", param_hint="--device")


_PEER_HELP = "Also time SpikingJelly's neurons (spikingjelly, installed with the peer extra)."


@bench.command("step")
@click.option("--backbone", default="preact_resnet18_cifar", show_default=True, help="A timm model name.")
@click.option("--input", "input_shape", default="3,32,32", show_default=True, help="One sample's C,H,W.")
@click.option("--classes", type=click.IntRange(min=2), default=10, show_default=True)
@click.option("--methods", "method_names", default="ann,dsr,dsr_repr,sg", show_default=True,
              help="Comma-separated: ann, dsr, dsr_repr, dsr_repr_nocov, sg, qcfs (the ANN always runs).")
@click.option("--T", "time_steps", default="1,2,4,8,16", show_default=True, help="Comma-separated time steps.")
@click.option("--batch-size", "--batch", "batch_size", type=click.IntRange(min=1), default=32, show_default=True,
              help="B, samples per step (the ANN's T rows: T*B).")
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True, help="Timed steps.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed steps first.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--peer", "peer_name", default=None, metavar="spikingjelly", help=_PEER_HELP + " Rows sj_dsr, sj_sg.")
@click.option("--out-dir", type=click.Path(file_okay=False), default="results/bench", show_default=True)
def bench_step(backbone: str, input_shape: str, classes: int, method_names: str, time_steps: str, batch_size: int,
               steps: int, warmup: int, device: str, precision: str, peer_name: str | None, out_dir: str) -> None:
    """Training-step time and peak memory against T, per method, on one backbone; the ANN at batch T*B is the
    floor. A table, and JSON, CSV and PNG in --out-dir."""
    from pathlib import Path

    from harness.bench import BENCH_METHODS, run_step_bench

    _check_device(device)
    names = _names(method_names, "--methods", "method", list(BENCH_METHODS))
    run_step_bench(backbone, names, _positive_ints(time_steps, "--T"), batch_size, classes,
                   tuple(_positive_ints(input_shape, "--input")), steps, warmup, device, precision, Path(out_dir),
                   echo=click.echo, peer_name=peer_name)


@bench.command("neuron")
@click.option("--shape", default="64,32,32", show_default=True, help="One sample's C,H,W at the layer.")
@click.option("--T", "time_steps", default="4,8", show_default=True, help="Comma-separated time steps.")
@click.option("--batch-size", "--batch", "batch_size", type=click.IntRange(min=1), default=16, show_default=True,
              help="B (the layer sees T*B samples).")
@click.option("--neuron", "neurons", default="if,lif", show_default=True, help="Comma-separated: if, lif.")
@click.option("--precision", "precisions", default="fp32", show_default=True, help="Comma-separated: fp32, bf16.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True, help="Timed calls.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed calls first.")
@click.option("--peer", "peer_name", default=None, metavar="spikingjelly", help=_PEER_HELP + " Rows sj.")
@click.option("--out-dir", type=click.Path(file_okay=False), default="results/bench", show_default=True)
def bench_neuron(shape: str, time_steps: str, batch_size: int, neurons: str, precisions: str, device: str,
                 steps: int, warmup: int, peer_name: str | None, out_dir: str) -> None:
    """One DSR layer's forward and forward+backward, plain loop and fused kernel, against a clone of its input:
    ms, bytes moved, GB/s. A table, and JSON, CSV and PNG in --out-dir."""
    from pathlib import Path

    from harness.bench.neuron import DTYPES, NEURONS, run_neuron_bench

    _check_device(device)
    run_neuron_bench(tuple(_positive_ints(shape, "--shape")), _positive_ints(time_steps, "--T"), batch_size,
                     _names(neurons, "--neuron", "neuron", list(NEURONS)),
                     _names(precisions, "--precision", "precision", list(DTYPES)),
                     device, steps, warmup, Path(out_dir), echo=click.echo, peer_name=peer_name)


@bench.command("backward")
@click.argument("recipe", type=click.Path())
@click.option("-o", "--override", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a recipe field (repeatable).")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="A checkpoint (last.pt, best.pt) of this recipe's model; default: fresh weights.")
@click.option("--label", default=None, help="Names the result file; default: 'init', or the checkpoint's folder.")
@click.option("--batches", type=click.IntRange(min=1), default=1, show_default=True, help="Training batches.")
@click.option("--out-dir", type=click.Path(file_okay=False), default="results/bench", show_default=True)
def bench_backward(recipe: str, overrides: tuple[str, ...], weights: str | None, label: str | None, batches: int,
                   out_dir: str) -> None:
    """Per-parameter cosine similarity of DSR's representation backward to the exact one (a DSR recipe)."""
    import json
    from pathlib import Path

    from harness.bench import gradient_agreement
    from harness.recipe import load_recipe

    result = gradient_agreement(load_recipe(recipe, overrides), Path(weights) if weights else None, batches)
    for row in result["batches"][0]["parameters"]:
        click.echo(f"{row['parameter']:<40} cosine {row['cosine']:.6f}  relative difference "
                   f"{row['relative_difference']:.2e}")
    label = label or (Path(weights).parent.name if weights else "init")
    path = Path(out_dir) / f"backward_{result['recipe']}_{label}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    click.echo(f"min cosine {result['min_cosine']:.6f} over {batches} batch(es); all parameters "
               f"{result['batches'][0]['all_parameters_cosine']:.6f}; wrote {path}")


@main.command()
@click.argument("sweep_file", metavar="SWEEP", type=click.Path())
@click.option("--address", default=None, metavar="auto|ray://HOST:PORT",
              help="Join a running Ray cluster; default: start Ray here.")
@click.option("--dry-run", is_flag=True, help="List the trials and exit.")
@click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[SWEEP_DIR]",
              help="Continue an interrupted sweep; alone: the newest one of this sweep name.")
@click.option("-o", "--override", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a recipe field in every trial (repeatable).")
@click.option("--only", default=None, metavar="VARIANT[,VARIANT]", help="Run only these variants.")
@click.option("--num-cpus", type=click.IntRange(min=1), default=None, help="CPUs of a Ray started here.")
def sweep(sweep_file: str, address: str | None, dry_run: bool, resume: str | None, overrides: tuple[str, ...],
          only: str | None, num_cpus: int | None) -> None:
    """Run the Ray Tune sweep a SWEEP file (YAML) describes; each trial is one launch and one MLflow run."""
    from harness.sweep import describe, expand, load_sweep, run_sweep

    variants = tuple(v.strip() for v in only.split(",")) if only else ()
    if dry_run:
        spec = load_sweep(sweep_file)
        trials = expand(spec, sweep_file, overrides, variants)
        click.echo(describe(trials))
        if spec.tuning is not None:
            cells = len({t.cell for t in trials})
            click.echo(f"tuning stage: {cells} cells x {spec.tuning.trials} configurations on "
                       f"{spec.tuning.holdout:g} of the training data held out ({spec.tuning.metric}, ASHA per cell); "
                       f"then the final stage: {cells} cells x {len(spec.final.seeds)} seeds "
                       f"({', '.join(map(str, spec.final.seeds))}) = {cells * len(spec.final.seeds)} runs on the "
                       f"whole training data, evaluated on test")
        return
    summary = run_sweep(sweep_file, overrides, variants, address=address, resume=resume, num_cpus=num_cpus,
                        echo=click.echo)
    runs = ", ".join(f"{count} {status}" for status, count in summary["runs"].items())
    click.echo(f"sweep {summary['sweep_id']}: {summary['status']}; runs: {runs}; MLflow parent run "
               f"{summary['parent_run_id']} in experiment '{summary['experiment']}' at {summary['tracking_uri']}")
    click.echo(f"table: harness table --experiment {summary['experiment']} --sweep {summary['sweep_id']} "
               f"--tracking-uri {summary['tracking_uri']}")
    if summary["status"] == "KILLED":
        click.echo(f"interrupted; continue with: harness sweep {sweep_file} --resume {summary['experiment_dir']}",
                   err=True)
        sys.exit(130)
    if summary["failed_trials"]:
        click.echo(f"failed trials (after their retries): {', '.join(summary['failed_trials'])}", err=True)
        sys.exit(1)


def _tracking_uri(given: str | None) -> str:
    from harness.track import tracking_uri

    return given or tracking_uri()


@main.command()
@click.option("--experiment", required=True, help="MLflow experiment name.")
@click.option("--sweep", "sweep_id", default=None, help="Only the runs of this sweep id.")
@click.option("--rows", default="method,neuron", show_default=True, help="Keys (tags or params) of the rows.")
@click.option("--cols", default="T", show_default=True, help="Key of the columns ('' for one column).")
@click.option("--metric", default="test/acc1", show_default=True)
@click.option("--agg", type=click.Choice(["mean_std", "mean", "min", "max"]), default="mean_std", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["md", "latex", "csv"]), default="md", show_default=True)
@click.option("--reference", "references", multiple=True, type=click.Path(),
              help="YAML of published numbers, or a folder of them (repeatable).")
@click.option("--precision", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--footnote", "footnotes", multiple=True, metavar="VALUE=TEXT",
              help="A footnote on the rows whose key VALUE matches (e.g. qcfs=...), printed below (repeatable).")
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="Write here instead of printing.")
@click.option("--tracking-uri", default=None, help="Default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here.")
def table(experiment: str, sweep_id: str | None, rows: str, cols: str, metric: str, agg: str, fmt: str,
          references: tuple[str, ...], precision: int, footnotes: tuple[str, ...], output: str | None,
          tracking_uri: str | None) -> None:
    """Comparison table of FINISHED MLflow runs: a metric aggregated over seeds, rows x columns (a tuned sweep's
    final runs add what the tuning chose per cell)."""
    from pathlib import Path

    from harness.report import ReportError, comparison

    keys = [k.strip() for k in rows.split(",") if k.strip()]
    notes = {}
    for given in footnotes:
        key, sep, text = given.partition("=")
        if not sep or not key.strip() or not text.strip():
            raise ReportError(f"--footnote {given!r}: expected VALUE=TEXT (a row key value, then the footnote)")
        notes[key.strip()] = text.strip()
    text = comparison(experiment, _tracking_uri(tracking_uri), keys, cols.strip() or None, metric, agg, fmt,
                      sweep=sweep_id, references=references, precision=precision,
                      note=lambda line: click.echo(line, err=True), footnotes=notes)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text if text.endswith("\n") else text + "\n")
        click.echo(f"wrote {output}")
    else:
        click.echo(text)


@main.command()
@click.option("--experiment", required=True, help="MLflow experiment name.")
@click.option("--sweep", "sweep_id", default=None, help="Only the runs of this sweep id.")
@click.option("--metric", default="test/acc1", show_default=True)
@click.option("--energy", default="efficiency/energy_uj", show_default=True, help="Energy metric (right panel x).")
@click.option("--series", default="method,neuron", show_default=True, help="Keys that name a curve.")
@click.option("--x", "x_key", default="T", show_default=True, help="Key of the left panel's x axis.")
@click.option("--curves", is_flag=True, help="Instead: the metric per epoch, one panel per --x value.")
@click.option("--output", type=click.Path(dir_okay=False), required=True, help="PNG file to write.")
@click.option("--tracking-uri", default=None, help="Default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here.")
def plot(experiment: str, sweep_id: str | None, metric: str, energy: str, series: str, x_key: str, curves: bool,
         output: str, tracking_uri: str | None) -> None:
    """Accuracy vs T and accuracy vs energy per method (or, with --curves, accuracy per epoch), from FINISHED
    MLflow runs, to PNG."""
    from harness.report import curves as draw_curves
    from harness.report import plot as draw

    keys = [k.strip() for k in series.split(",") if k.strip()]
    if curves:
        path = draw_curves(experiment, _tracking_uri(tracking_uri), output, metric, keys, x_key, sweep_id)
    else:
        path = draw(experiment, _tracking_uri(tracking_uri), output, metric, energy, keys, x_key, sweep_id)
    click.echo(f"wrote {path}")


@main.command("track-replay")
@click.argument("run_dir", type=click.Path(file_okay=False))
def track_replay(run_dir: str) -> None:
    """Send what a run kept in RUN_DIR/tracking-unsent.jsonl (its tracking server was away) to that server,
    and end the MLflow run as the run ended."""
    from harness.track import replay_unsent

    done = replay_unsent(run_dir)
    click.echo(f"replayed {done['metrics']} metrics ({done['entries']} entries) to MLflow run {done['run_id']} at "
               f"{done['tracking_uri']}; the run ended {done['status']}")


def run() -> None:
    """Entry point: user errors become one line and exit code 2 (a non-finite loss or gradient: one line, 3);
    Ctrl-C (SIGINT) ends a run KILLED (130); during training SIGTERM and SIGUSR1 stop it at the next step
    boundary with a checkpoint (KILLED, 75: `harness.engine.preemption`), elsewhere SIGTERM ends it at once (143).
    SIGINT gets Python's handler even where the parent started us with SIGINT ignored (as a
    non-interactive shell does for `cmd &`), so an interrupt always ends the run cleanly."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main(standalone_mode=False)
    except HarnessError as e:  # bad input: 2; a numerical fault (NonFiniteError): 3
        click.echo(f"error: {e}", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.BadParameter as e:  # e.g. a directory given as RECIPE: one line, as for all bad input
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    run()
