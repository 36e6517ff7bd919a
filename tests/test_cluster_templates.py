"""The cluster templates parse, and every recipe, path and verb they name exists."""

import json
import re
import subprocess
from pathlib import Path

import yaml

from harness.cli import main
from harness.engine.engines.deepspeed import deepspeed_config
from harness.engine.preemption import PREEMPTED_EXIT_CODE
from harness.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
TEMPLATES = sorted(p for p in CLUSTER.rglob("*") if p.is_file() and p.suffix != ".gz")  # the gzipped CRD schema is data


def test_every_kind_of_template_is_there():
    names = {p.relative_to(CLUSTER).as_posix() for p in TEMPLATES}
    assert {"README.md", "slurm/ddp_multinode.sbatch", "ray/cluster.yaml", "k8s/rayjob.yaml",
            "deepspeed/hostfile", "deepspeed/zero2.json"} <= names


def test_slurm_script_is_valid_bash_that_rendezvouses_on_the_first_node():
    script = CLUSTER / "slurm" / "ddp_multinode.sbatch"
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = script.read_text()
    assert text.startswith("#!/bin/bash\n") and "#SBATCH --nodes=" in text
    assert "scontrol show hostnames" in text and "--rdzv_endpoint \"$head_node:" in text
    assert "-m harness.cli launch" in text and "MLFLOW_TRACKING_URI:?" in text


def test_slurm_script_forwards_the_time_limit_warning_and_requeues():
    """The signal path docs/reliability.md describes: USR1 to the script, passed to the step, forwarded by torchrun
    to every rank (which checkpoints and exits 75), then a requeue that resumes. (A real SLURM runs it:
    tests/test_clusters.py.)"""
    text = (CLUSTER / "slurm" / "ddp_multinode.sbatch").read_text()
    assert re.search(r"^#SBATCH --signal=B:USR1@\d+$", text, re.M) and "#SBATCH --requeue" in text
    assert "trap forward_stop USR1" in text and 'scancel --signal=USR1 "$SLURM_JOB_ID"' in text
    assert "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in text and "--shutdown-timeout" in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text and "SLURM_RESTART_COUNT" in text
    assert f"PREEMPTED_EXIT={PREEMPTED_EXIT_CODE}" in text


def test_ray_cluster_yaml_installs_the_project_on_every_node():
    config = yaml.safe_load((CLUSTER / "ray" / "cluster.yaml").read_text())
    assert {"cluster_name", "provider", "head_start_ray_commands", "worker_start_ray_commands"} <= set(config)
    assert any("pip install -e" in c for c in config["setup_commands"])  # setup_commands run on head and workers
    assert "." in config["file_mounts"].values()


def test_kuberay_rayjob_runs_an_existing_sweep():
    job = yaml.safe_load((CLUSTER / "k8s" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    verb, sweep_file = job["spec"]["entrypoint"].split()[1:3]
    assert verb in main.commands and (REPO / sweep_file).is_file()
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["MLFLOW_TRACKING_URI"].startswith("http")  # a shared server, not a sqlite file
    assert job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"]


def test_deepspeed_hostfile_and_config_fit_the_recipe_they_are_shown_with(tmp_path):
    """cluster/README.md runs recipes/imagenet_resnet34_ann.yaml over the hostfile's slots with zero2.json: the
    global batch must split over that many processes, and the JSON must agree with the recipe."""
    hosts = [line for line in (CLUSTER / "deepspeed" / "hostfile").read_text().splitlines()
             if line and not line.startswith("#")]
    assert hosts and all(re.fullmatch(r"\S+ slots=\d+", line) for line in hosts)
    processes = sum(int(line.split("slots=")[1]) for line in hosts)
    path = CLUSTER / "deepspeed" / "zero2.json"
    assert json.loads(path.read_text())["zero_optimization"]["stage"] == 2
    assert "recipes/imagenet_resnet34_ann.yaml" in (CLUSTER / "README.md").read_text()
    recipe = load_recipe(REPO / "recipes" / "imagenet_resnet34_ann.yaml",
                         ["engine.kind=deepspeed", f"engine.deepspeed.config={path}"])
    config = deepspeed_config(recipe.engine, recipe.data.batch_size, recipe.optim.grad_clip, processes)
    assert config["train_batch_size"] == recipe.data.batch_size == processes * config["train_micro_batch_size_per_gpu"]
    assert config["bf16"] == {"enabled": recipe.engine.precision == "bf16"} and "scheduler" not in config


def test_paths_recipes_and_verbs_named_in_templates_exist():
    mentioned = 0
    for template in TEMPLATES:
        text = template.read_text()
        for path in re.findall(r"(?:recipes|cluster)/[\w./-]+\.(?:yaml|json|sbatch|md)|cluster/deepspeed/hostfile",
                               text):
            mentioned += 1
            assert (REPO / path).is_file(), f"{template.relative_to(REPO)} names {path}, which does not exist"
        for verb in re.findall(r"harness(?:\.cli)? (\w+) ", text):
            assert verb in main.commands, f"{template.relative_to(REPO)}: no verb `harness {verb}`"
    assert mentioned >= 5
