"""The `harness` command on bad input: exit code 2, one line naming the file, the field and what is
allowed, and nothing written to MLflow (the store file is never even created)."""

import subprocess
import sys

import pytest

from harness.cli import run
from harness.engine.launch import launch
from harness.recipe import load_recipe

GOOD = """name: digits_cli
data: {{dataset: {dataset}, root: {root}, batch_size: 128}}
model: {{backbone: {backbone}}}
method: {{name: dsr, T: {T}}}
optim: {{lr: {lr}, epochs: 1}}
track: {{experiment: cli, output_dir: "{tmp}/runs"}}
"""


def recipe_text(tmp_path, **changes):
    fields = dict(dataset="digits", root="null", backbone="snn_convnet", T=2, lr=0.05, tmp=tmp_path)
    fields.update(changes)
    return GOOD.format(**fields)


def harness(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["harness", *argv])
    with pytest.raises(SystemExit) as exit_info:
        run()
    return exit_info.value.code, capsys.readouterr()


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return tmp_path


CASES = {
    "malformed yaml": (lambda t: "name: x\nmethod: {name: dsr\n", (), "malformed YAML"),
    "unknown key": (lambda t: recipe_text(t) + "extras: 1\n", (), "extras: unknown key; allowed: name, seed"),
    "wrong type": (lambda t: recipe_text(t, lr="fast"), (), "optim.lr: Input should be a valid number"),
    "T=0": (lambda t: recipe_text(t, T=0), (), "method.T: Input should be greater than or equal to 1 (got 0)"),
    "negative lr": (lambda t: recipe_text(t), ("-o", "optim.lr=-1"), "optim.lr: Input should be greater than 0"),
    "missing data root": (lambda t: recipe_text(t, dataset="cifar10", root=f"{t}/nowhere"), (),
                          "data: cifar10 root {t}/nowhere: does not exist; expected the python-pickle layout"),
    "unknown backbone": (lambda t: recipe_text(t, backbone="resnet_9000"), (),
                         "model.backbone: unknown backbone 'resnet_9000'"),
    "ann on event frames": (lambda t: recipe_text(t), ("-o", "method={name: ann}", "-o", "data.frames=2"),
                            "method.name: ann takes single images, but data.frames (2) makes every sample a "
                            "sequence of frames; use dsr or sg"),
    "batch over --nproc": (lambda t: recipe_text(t), ("-o", "engine.kind=ddp", "--nproc", "3"),
                           "data.batch_size: 128 does not split evenly over 3 processes; use a multiple of 3"),
    "qcfs on event frames": (lambda t: recipe_text(t), ("-o", "method={name: qcfs, T: 2}", "-o", "data.frames=2"),
                             "method.name: qcfs takes single images"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(isolated, monkeypatch, capsys, case):
    text, extra_args, expected = CASES[case]
    path = isolated / "bad.yaml"
    path.write_text(text(isolated))
    code, out = harness(monkeypatch, capsys, "launch", str(path), *extra_args)
    assert code == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert expected.format(t=isolated) in lines[0]
    assert lines[0].startswith(f"error: {path}: ") and lines[0].count(f"{path}:") == 1  # named once
    assert not (isolated / "mlflow.db").exists() and not (isolated / "runs").exists()


@pytest.mark.slow
def test_resume_with_a_checkpoint_of_another_recipe(isolated, monkeypatch, capsys):
    first = isolated / "first.yaml"
    first.write_text(recipe_text(isolated))
    summary = launch(load_recipe(first), echo=lambda *_: None)
    other = isolated / "other.yaml"
    other.write_text(recipe_text(isolated, T=3))
    runs_before = (isolated / "mlflow.db").stat().st_mtime
    capsys.readouterr()  # drop what the first launch printed
    code, out = harness(monkeypatch, capsys, "launch", str(other), "--resume", summary["run_dir"])
    assert code == 2
    assert "checkpoint was written by another recipe" in out.err and "method.T (checkpoint 2, recipe 3)" in out.err
    assert len(out.err.strip().splitlines()) == 1
    assert (isolated / "mlflow.db").stat().st_mtime == runs_before


def test_resume_of_a_non_checkpoint(isolated, monkeypatch, capsys):
    path = isolated / "r.yaml"
    path.write_text(recipe_text(isolated))
    (isolated / "junk").mkdir()
    (isolated / "junk" / "last.pt").write_bytes(b"not a checkpoint")
    code, out = harness(monkeypatch, capsys, "launch", str(path), "--resume", str(isolated / "junk"))
    assert code == 2 and "last.pt: not a readable harness checkpoint" in out.err


def test_dry_run_prints_the_resolved_recipe(isolated, monkeypatch, capsys):
    path = isolated / "r.yaml"
    path.write_text(recipe_text(isolated))
    monkeypatch.setattr(sys, "argv", ["harness", "launch", str(path), "--dry-run", "-o", "method.neuron=lif"])
    run()
    out = capsys.readouterr().out
    assert "neuron: lif" in out and "dt: 0.05" in out and "alpha: 0.3" in out
    assert not (isolated / "mlflow.db").exists()


@pytest.mark.slow
def test_console_script_exit_code(tmp_path):
    """The installed entry point, as a user runs it."""
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nmethod: {name: dsr, T: 0}\n")
    exe = [sys.executable, "-m", "harness.cli"]
    done = subprocess.run([*exe, "launch", str(path)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {path}: method.T: Input should be greater than or equal to 1 (got 0)"
