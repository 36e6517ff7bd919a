"""Clusters really started on this machine (tests/clusters.py): the project's SLURM script under a one-node SLURM
cluster, two torchrun launchers as two nodes, a sweep on a two-node Ray cluster (by address, by Ray Client and
as a Ray job), all of them logging to a real `mlflow server` on loopback, artifacts included.

The multi-node equality uses the tolerance of tests/test_distributed.py (ATOL, justified there): two processes
on two "nodes" are the same DDP arithmetic as two processes on one, only the rendezvous differs.
"""

import os
import subprocess
import sys
from pathlib import Path

import clusters
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from test_distributed import ATOL, one_process_reference, write_recipe

from harness.engine import checkpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "cluster" / "slurm" / "ddp_multinode.sbatch"
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
SLURM_ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
               "DEADLINE"}


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> str:
    """A real MLflow tracking server for every test here."""
    with clusters.mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> clusters.SlurmCluster:
    reason = clusters.slurm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with clusters.slurm_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory) -> clusters.RayCluster:
    reason = clusters.ray_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with clusters.ray_cluster(tmp_path_factory.mktemp("raycluster"), env=run_env()) as cluster:
        yield cluster


def run_env(**extra: str) -> dict[str, str]:
    """The jobs' environment: on the CPU even where a GPU is visible (two processes, at most one GPU)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0",
               CUDA_VISIBLE_DEVICES="",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **extra)
    return env


def runs_of(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id], max_results=1000)


def epochs_logged(uri: str, run_id: str) -> list[int]:
    return [m.step for m in MlflowClient(uri).get_metric_history(run_id, "test/acc1")]


def assert_artifact_served(uri: str, run_id: str, name: str, expected: str, tmp_path: Path) -> None:
    """`name` was uploaded through the server (proxied artifacts) and reads back as `expected`."""
    client = MlflowClient(uri)
    assert name in {a.path for a in client.list_artifacts(run_id)}
    local = client.download_artifacts(run_id, name, str(tmp_path))
    assert Path(local).read_text() == expected


# ----------------------------------------------------------------------------------------------------- SLURM


def submit_quickstart(slurm, tracking: str, tmp_path: Path, experiment: str, epochs: int) -> tuple[str, Path]:
    """sbatch the project's script with the quickstart, as cluster/README.md shows for a CPU node; the job id and
    its log file."""
    env = run_env(MLFLOW_TRACKING_URI=tracking, RECIPE=str(QUICKSTART), NPROC_PER_NODE="2",
                  RENDEZVOUS_PORT=str(clusters.free_port()),
                  HARNESS_ARGS=f"-o optim.epochs={epochs} -o track.experiment={experiment} "
                               f"-o track.output_dir={tmp_path / 'runs'}")
    job = slurm.sbatch("--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=20", str(SBATCH),
                       env=env, cwd=tmp_path)
    return job, tmp_path / f"slurm-{job}.out"


def test_sbatch_runs_the_quickstart_under_torchrun_ddp_to_a_finished_mlflow_run(slurm, tracking, tmp_path):
    job, log = submit_quickstart(slurm, tracking, tmp_path, "slurm-quickstart", epochs=2)
    state = slurm.wait_for_state(job, SLURM_ENDED, 400, log)
    output = log.read_text()
    assert state == "COMPLETED", output[-3000:]
    assert "x 2 processes (ddp)" in output and "final test acc1" in output
    [run] = runs_of(tracking, "slurm-quickstart")
    assert run.info.status == "FINISHED" and epochs_logged(tracking, run.info.run_id) == [1, 2]
    [run_dir] = (tmp_path / "runs" / "quickstart").iterdir()
    assert_artifact_served(tracking, run.info.run_id, "recipe.yaml", (run_dir / "recipe.yaml").read_text(), tmp_path)


def last_epoch(runs: Path) -> int:
    """Epochs completed in the newest checkpoint under `runs` (0 while there is none)."""
    found = sorted(runs.glob(f"*/{checkpoint.LAST}"))
    return checkpoint.load(found[-1])["epoch"] if found else 0


def test_a_preempted_slurm_job_resumes_from_its_checkpoint_in_the_same_mlflow_run(slurm, tracking, tmp_path):
    """Both ways SLURM stops a job, one after the other. `scontrol requeue` (a preemption): SIGTERM to the script
    and the step, the ranks checkpoint and stop, SLURM starts the job again (SLURM_RESTART_COUNT=1), the script
    adds --resume. Then the time-limit warning (`--signal=B:USR1@180`, sent now with `scancel --batch
    --signal=USR1`): the script forwards USR1 to the step, torchrun to the ranks, which checkpoint and exit 75,
    and the script requeues the job itself. The run continues through both, in one MLflow run and one folder."""
    job, log = submit_quickstart(slurm, tracking, tmp_path, "slurm-requeue", epochs=4)
    runs = tmp_path / "runs" / "quickstart"
    clusters.wait_until(lambda: last_epoch(runs) >= 1, 300, "the first epoch's checkpoint", log)
    slurm.run("scontrol", "requeue", job)
    slurm.wait_for_requeue(job, 1, 120, log)
    clusters.wait_until(lambda: last_epoch(runs) >= 2, 300, "a checkpoint of the requeued job", log)
    slurm.run("scancel", "--batch", "--signal=USR1", job)
    slurm.wait_for_requeue(job, 2, 300, log)
    state = slurm.wait_for_state(job, SLURM_ENDED, 400, log)
    output = log.read_text()
    assert state == "COMPLETED", output[-3000:]
    assert "SIGTERM: the ranks checkpoint and stop" in output and "(restart 1)" in output
    assert "USR1: asking every rank to checkpoint and stop" in output and "requeueing to resume" in output
    assert "(restart 2)" in output and output.count("resuming ") == 2, output[-3000:]
    [run] = runs_of(tracking, "slurm-requeue")  # one run: the requeued job continued it, twice
    assert run.info.status == "FINISHED" and run.data.tags.get("resumed")
    assert set(epochs_logged(tracking, run.info.run_id)) == {1, 2, 3, 4}
    [run_dir] = runs.iterdir()  # the same run folder
    assert checkpoint.load(run_dir / checkpoint.LAST)["epoch"] == 4


# ------------------------------------------------------------------------------------------- multi-node DDP


def torchrun_node(node_rank: int, port: int, recipe: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--node_rank", str(node_rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
            "--rdzv_id", "two-nodes", "-m", "harness.cli", "launch", str(recipe)]


def two_nodes(recipe: Path, cwd: Path) -> list[subprocess.CompletedProcess]:
    """Two torchrun launchers, each a node of one process, rendezvous (c10d) on 127.0.0.1; both finished."""
    port = clusters.free_port()
    procs = [subprocess.Popen(torchrun_node(rank, port, recipe), cwd=cwd, env=run_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        return [subprocess.CompletedProcess(p.args, p.wait(timeout=400), p.stdout.read()) for p in procs]
    finally:
        for proc in procs:
            proc.kill()


def test_two_torchrun_nodes_end_with_the_weights_of_one_process(tracking, tmp_path):
    """The equality test of tests/test_distributed.py, launched as two nodes through `harness launch`: rank 0's
    final weights (thresholds included) equal one process's at the same global batch, and the job logs one
    FINISHED run to the tracking server."""
    recipe = write_recipe(tmp_path, "two_nodes", {"name": "dsr", "neuron": "if", "T": 2, "vth": {"init": 1.0}},
                          track={"tracking_uri": tracking, "experiment": "two-nodes"})
    done = two_nodes(recipe, tmp_path)
    assert all(d.returncode == 0 for d in done), "\n".join(d.stdout[-3000:] for d in done)
    assert sum("x 2 processes (ddp)" in d.stdout for d in done) == 1  # rank 0 speaks, on one of the nodes
    [run_dir] = (tmp_path / "runs" / "two_nodes").iterdir()
    trained = checkpoint.load(run_dir / checkpoint.LAST)["model"]
    initial, single = one_process_reference(recipe)
    thresholds = [k for k in single if k.endswith("vth")]
    assert thresholds and all((single[k] - initial[k]).abs() > 10 * ATOL for k in thresholds)
    for key, value in single.items():
        if value.is_floating_point():
            torch.testing.assert_close(trained[key], value, atol=ATOL, rtol=0, msg=key)
    [run] = runs_of(tracking, "two-nodes")
    assert run.info.status == "FINISHED" and epochs_logged(tracking, run.info.run_id) == [1]
    summary = (run_dir / "summary.json").read_text()
    assert_artifact_served(tracking, run.info.run_id, "summary.json", summary, tmp_path)


def test_a_two_node_job_refuses_a_sqlite_tracking_uri_in_one_line(tmp_path):
    db = tmp_path / "mlflow.db"
    recipe = write_recipe(tmp_path, "sqlite_nodes", {"name": "ann"})  # tracking_uri: sqlite:///<tmp>/mlflow.db
    done = two_nodes(recipe, tmp_path)
    for d in done:
        assert d.returncode != 0
        lines = [line for line in d.stdout.splitlines() if "is a file on this machine" in line]
        assert lines and f"sqlite:///{db}" in lines[0] and "spans 2 nodes" in lines[0], d.stdout[-3000:]
        assert "MLFLOW_TRACKING_URI=http" in lines[0]
    assert not db.exists() and not (tmp_path / "runs").exists()  # refused before anything was written


# -------------------------------------------------------------------------------------------------------- Ray


def write_sweep(tmp_path: Path, name: str, tracking: str, trials: int = 2) -> Path:
    """A sweep of `trials` one-epoch digits trials (1 CPU each: one per node of the test cluster), absolute
    paths throughout so that it runs from any folder (a Ray job's)."""
    recipe = write_recipe(tmp_path, f"{name}_base", {"name": "dsr", "neuron": "if", "T": 2, "vth": {"init": 1.0}},
                          engine={"kind": "single", "sync_bn": False}, track={"tracking_uri": tracking,
                                                                             "experiment": name})
    sweep = {"name": name, "recipe": str(recipe), "storage": str(tmp_path / "ray_results"),
             "resources": {"cpu": 1}, "space": {"seed": list(range(trials))}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def assert_sweep_finished(tracking: str, experiment: str, trials: int) -> tuple:
    """`(parent run, trial runs)` of the sweep's experiment, all FINISHED."""
    runs = runs_of(tracking, experiment)
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep.role") != "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == trials and all(r.info.status == "FINISHED" for r in children)
    return parents[0], children


def test_a_sweep_by_address_runs_its_trials_on_both_nodes(ray_cluster, tracking, tmp_path):
    sweep = write_sweep(tmp_path, "ray-address", tracking)
    done = subprocess.run([str(clusters.BIN / "harness"), "sweep", str(sweep), "--address", ray_cluster.address],
                          cwd=tmp_path, env=ray_cluster.env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    parent, children = assert_sweep_finished(tracking, "ray-address", 2)
    assert {r.data.tags["sweep.node_id"] for r in children} == set(ray_cluster.node_ids)
    assert_artifact_served(tracking, parent.info.run_id, "sweep.yaml", sweep.read_text(), tmp_path)


def test_a_sweep_through_ray_client_runs_on_the_cluster(ray_cluster, tracking, tmp_path):
    sweep = write_sweep(tmp_path, "ray-client", tracking)
    done = subprocess.run([str(clusters.BIN / "harness"), "sweep", str(sweep), "--address",
                           ray_cluster.client_address], cwd=tmp_path, env=ray_cluster.env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    _, children = assert_sweep_finished(tracking, "ray-client", 2)
    assert {r.data.tags["sweep.node_id"] for r in children} <= set(ray_cluster.node_ids)


def test_ray_job_submit_runs_a_sweep_on_the_cluster(ray_cluster, tracking, tmp_path):
    sweep = write_sweep(tmp_path, "ray-job", tracking)
    done = subprocess.run(["ray", "job", "submit", "--address", ray_cluster.dashboard, "--",
                           "harness", "sweep", str(sweep), "--address", "auto"],
                          cwd=tmp_path, env=ray_cluster.env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "succeeded" in done.stdout + done.stderr, (done.stdout + done.stderr)[-4000:]
    _, children = assert_sweep_finished(tracking, "ray-job", 2)
    assert {r.data.tags["sweep.node_id"] for r in children} <= set(ray_cluster.node_ids)


def test_a_sweep_on_a_two_node_cluster_refuses_a_sqlite_tracking_uri(ray_cluster, tmp_path):
    db = tmp_path / "mlflow.db"
    sweep = write_sweep(tmp_path, "ray-sqlite", f"sqlite:///{db}")
    done = subprocess.run([str(clusters.BIN / "harness"), "sweep", str(sweep), "--address", ray_cluster.address],
                          cwd=tmp_path, env=ray_cluster.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert f"sqlite:///{db}" in message and "spans 2 nodes" in message and "MLFLOW_TRACKING_URI=http" in message
    assert not db.exists() and not (tmp_path / "ray_results").exists()

