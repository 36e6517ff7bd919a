"""Runs that survive preemption, kills, corrupted checkpoints and non-finite steps (docs/reliability.md).

Each test really does the fault: a real SIGTERM/SIGUSR1 (to this process, or to a `harness launch` child),
SIGKILL of a real child at random moments, bytes zeroed in a real checkpoint file, a NaN injected into a real
training step. "Exactly the weights of an uninterrupted run" compares every tensor of the final `last.pt`
(model and optimizer) with `torch.equal`: on the CPU with `engine.threads: 1` a run is bit-for-bit
deterministic, so any difference in data order, RNG state or optimizer state after a resume shows.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from runhelpers import digits_recipe, launch_and_stop

from harness.cli import run
from harness.engine import checkpoint
from harness.engine.distributed import ProcessInfo
from harness.engine.engines import LocalEngine, NonFiniteError
from harness.engine.launch import launch
from harness.engine.preemption import PREEMPTED_EXIT_CODE, Preempted, StopRequest
from harness.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


def write_recipe(tmp_path: Path, name: str = "faults", method: dict | None = None, **sections) -> Path:
    return digits_recipe(tmp_path, name, method or {"name": "dsr", "neuron": "if", "T": 2, "vth": {"init": 2.0}},
                         {"seed": 1, "experiment": "faults", "engine": {"threads": 1},
                          "optim": {"lr": 0.05, "epochs": 2, "warmup_iters": 3}}, sections)


def mlflow_runs(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("faults")
    return client, client.search_runs([experiment.experiment_id]) if experiment else []


def assert_same_final_state(a_dir: str | Path, b_dir: str | Path) -> None:
    """Every tensor of the model and of the optimizer state in the two runs' final last.pt is identical."""
    a, b = (checkpoint.load(Path(d) / checkpoint.LAST) for d in (a_dir, b_dir))
    assert a["epoch"] == b["epoch"] and a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different, f"weights differ: {different[:5]}"
    for i, (sa, sb) in enumerate(zip(a["optimizer"].get("state", {}).values(),  # DeepSpeed: in its own files
                                     b["optimizer"].get("state", {}).values(), strict=True)):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"optimizer state {i}.{key} differs"


def signal_at_step(monkeypatch, step: int, signum: int, engine=LocalEngine) -> None:
    """Send `signum` to this process during training step `step` (as a scheduler would, at any moment)."""
    real = engine.train_step

    def train_step(self, x, y, at, stop_requested=False):
        if at == step:
            os.kill(os.getpid(), signum)
        return real(self, x, y, at, stop_requested)

    monkeypatch.setattr(engine, "train_step", train_step)


# ------------------------------------------------------------------------------------------ integrity
def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"model": {"w": torch.randn(4096)}, "epoch": 1, "rng": {"python": (3, (1, 2), None)}},
                           path)
    return path


def test_a_checkpoint_round_trips_with_its_checksum(tmp_path):
    path = _saved(tmp_path)
    state = checkpoint.load(path)
    assert state["epoch"] == 1 and "sha256" not in state and state["rng"]["python"] == (3, (1, 2), None)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == checkpoint.FORMAT and raw["sha256"] == checkpoint.content_digest(raw)


def test_zeroed_bytes_inside_a_tensor_are_refused(tmp_path):
    """What a user saw: 64 zeroed bytes in the middle of last.pt were accepted by --resume."""
    path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2  # inside the 16 KiB of tensor data, which dominates the file
    data[middle:middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    torch.load(path, weights_only=True)  # torch itself does not notice
    with pytest.raises(checkpoint.CheckpointError, match="corrupted: its content does not match its checksum") as e:
        checkpoint.load(path)
    assert str(e.value).startswith(f"{path}: ")


@pytest.mark.parametrize("damage,expected", [
    ("truncate", "not a readable harness checkpoint"),
    ("empty", "not a readable harness checkpoint"),
    ("foreign", "not a dsr-harness checkpoint: no"),
    ("old format", "checkpoint format 'dsr-harness-checkpoint/1'"),
    ("folder", "not a file"),
])
def test_damaged_or_foreign_files_are_refused_naming_the_file(tmp_path, damage, expected):
    path = _saved(tmp_path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "foreign":
        torch.save({"model": {"w": torch.ones(2)}, "epoch": 3}, path)
    elif damage == "old format":
        torch.save({"model": {}, "format": "dsr-harness-checkpoint/1", "sha256": "0"}, path)
    else:
        path.unlink()
        path.mkdir()
    with pytest.raises(checkpoint.CheckpointError, match=expected) as e:
        checkpoint.load(path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


class Payload:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_loading_never_executes_code(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "last.pt"
    torch.save({"model": {}, "payload": Payload(marker), "format": checkpoint.FORMAT, "sha256": "x"}, path)
    with pytest.raises(checkpoint.CheckpointError, match="not a readable harness checkpoint"):
        checkpoint.load(path)
    assert not marker.exists()


def test_a_killed_writers_temporary_files_are_cleaned_up(tmp_path):
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"half")
    checkpoint.Checkpointer(tmp_path, ProcessInfo())
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_from_a_corrupted_checkpoint_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    path = write_recipe(tmp_path)
    run_dir = tmp_path / "runs" / "faults" / "r1"
    run_dir.mkdir(parents=True)
    last = _saved(run_dir)
    data = bytearray(last.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    last.write_bytes(bytes(data))
    monkeypatch.setattr(sys, "argv", ["harness", "launch", str(path), "--resume", str(run_dir)])
    with pytest.raises(SystemExit) as exit_info:
        run()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {last}: corrupted")
    assert not (tmp_path / "mlflow.db").exists()  # nothing tracked


# ------------------------------------------------------------------------------------------ preemption
def test_a_second_sigterm_goes_to_the_previous_handler():
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _f: calls.append(signum))
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.requested and stop.name == "SIGUSR1" and calls == []
            os.kill(os.getpid(), signal.SIGTERM)  # asked again: end now
            assert calls == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_preempted_run_resumes_mid_epoch_to_exactly_the_uninterrupted_weights(tmp_path, monkeypatch, signum):
    monkeypatch.chdir(tmp_path)
    path = write_recipe(tmp_path)
    straight = launch(load_recipe(path), echo=lambda *_: None)

    signal_at_step(monkeypatch, 30, signum)  # the 30th step: epoch 2 (22 steps an epoch), mid-epoch
    lines = []
    with pytest.raises(Preempted) as stopped:
        launch(load_recipe(path), echo=lines.append)
    assert stopped.value.code == PREEMPTED_EXIT_CODE
    assert "continue with: harness launch <recipe> --resume" in lines[-1]
    (run_dir,) = [p for p in (tmp_path / "runs" / "faults").iterdir() if str(p) != straight["run_dir"]]
    state = checkpoint.load(run_dir / checkpoint.LAST)
    assert (state["epoch"], state["step"], state["epoch_step"]) == (1, 30, 8)  # right after the signalled step
    client, found = mlflow_runs(tmp_path)
    (killed,) = [r for r in found if r.info.status == "KILLED"]
    assert killed.data.tags["stopped"].startswith(f"stopped by {signal.Signals(signum).name} at step 30")

    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    resumed = launch(load_recipe(path), resume=str(run_dir), echo=lines.append)
    assert any("resuming in epoch 2 at step 8 of 22" in line for line in lines)
    assert_same_final_state(straight["run_dir"], resumed["run_dir"])
    assert client.get_run(killed.info.run_id).info.status == "FINISHED"
    history = client.get_metric_history(killed.info.run_id, "train/loss")
    reference = client.get_metric_history(straight["mlflow_run_id"], "train/loss")
    assert [(m.step, m.value) for m in history] == [(m.step, m.value) for m in reference]  # epoch 2's totals too


@pytest.mark.slow
def test_sigterm_to_harness_launch_checkpoints_and_exits_75(tmp_path):
    path = write_recipe(tmp_path, optim={"epochs": 200})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "launch", str(path)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "runs").glob("*/*/last.pt")):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.1)
        time.sleep(random.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == PREEMPTED_EXIT_CODE, output[-2000:]
    assert "stopped by SIGTERM at step" in output and "--resume" in output
    (last,) = (tmp_path / "runs").glob("*/*/last.pt")
    state = checkpoint.load(last)
    assert state["step"] == state["epoch"] * 22 + state["epoch_step"]
    _, found = mlflow_runs(tmp_path)
    assert [r.info.status for r in found] == ["KILLED"]


@pytest.mark.slow
def test_random_sigkills_never_leave_an_unloadable_checkpoint_and_resume_exactly(tmp_path):
    """At least 10 SIGKILLs of a real `harness launch` that checkpoints every step: half at a random moment,
    half the instant a checkpoint's temporary file appears (a kill during the write). After each: last.pt
    loads (checksum verified); the next `--resume` continues from it. The final weights equal an
    uninterrupted run's."""
    path = write_recipe(tmp_path, data={"batch_size": 32}, optim={"epochs": 4},
                        engine={"threads": 1, "checkpoint_every": 1})
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    launch_cmd = [sys.executable, "-m", "harness.cli", "launch", str(path)]
    rng = random.Random(11)
    kills, during_write, unloadable, resumes, run_dir = 0, 0, 0, 0, None
    while kills < 10:
        cmd = launch_cmd + ([f"--resume={run_dir}"] if run_dir else [])
        resumes += run_dir is not None
        before = checkpoint.load(run_dir / checkpoint.LAST)["step"] if run_dir else -1
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            while True:  # until this attempt has written a newer checkpoint
                assert proc.poll() is None, f"finished before kill {kills + 1}: {proc.stderr.read()[-2000:]}"
                assert time.monotonic() < deadline
                found = list((tmp_path / "runs" / "faults").glob(f"*/{checkpoint.LAST}"))
                if found:
                    run_dir = found[0].parent
                    try:
                        if checkpoint.load(run_dir / checkpoint.LAST)["step"] > before:
                            break
                    except checkpoint.CheckpointError:
                        pass  # replaced while being read; look again
                time.sleep(0.02)
            if kills % 2:  # kill the instant a checkpoint is being written
                while not list(run_dir.glob(".last.pt.*.tmp")) and proc.poll() is None:
                    pass
            else:
                time.sleep(rng.uniform(0.0, 0.15))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            proc.kill()
            proc.stderr.close()
        kills += 1
        during_write += bool(list(run_dir.glob(".last.pt.*.tmp")))
        try:
            checkpoint.load(run_dir / checkpoint.LAST)
        except checkpoint.CheckpointError:
            unloadable += 1
    done = subprocess.run(launch_cmd + [f"--resume={run_dir}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    straight = subprocess.run(launch_cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    (straight_dir,) = [p for p in (tmp_path / "runs" / "faults").iterdir() if p != run_dir]
    report = {"kills": kills, "during_a_checkpoint_write": during_write, "resumes": resumes + 1,
              "unloadable": unloadable}
    print(f"\nSIGKILL drill: {json.dumps(report)}")
    assert unloadable == 0 and during_write >= 1, report
    assert_same_final_state(straight_dir, run_dir)
    assert not list(run_dir.glob("*.tmp"))  # the last resume cleaned up what the kills left
    client, found = mlflow_runs(tmp_path)
    resumed = checkpoint.load(run_dir / checkpoint.LAST)["mlflow_run_id"]
    assert client.get_run(resumed).info.status == "FINISHED"  # one MLflow run through all the kills


# ------------------------------------------------------------------------------------------ non-finite steps
def poison(monkeypatch, steps: set[int], what: str = "loss", every_from: int | None = None) -> None:
    """Make the loss NaN (or, `what="grad"`, the second conv weight's gradient) at the given global steps."""
    real = LocalEngine.train_step

    def train_step(self, x, y, at, stop_requested=False):
        hit = at in steps or (every_from is not None and at >= every_from)
        handles = []
        if hit and what == "loss":
            forward = self.train_module.forward
            self.train_module.forward = lambda *a: (lambda out: (out[0] * float("nan"), out[1]))(forward(*a))
        if hit and what == "grad":
            param = dict(self.model.named_parameters())["features.conv2.weight"]
            handles.append(param.register_hook(lambda g: g * float("nan")))
        try:
            return real(self, x, y, at, stop_requested)
        finally:
            if hit and what == "loss":
                del self.train_module.forward
            for h in handles:
                h.remove()

    monkeypatch.setattr(LocalEngine, "train_step", train_step)


@pytest.mark.slow
@pytest.mark.parametrize("what,message", [
    ("loss", "step 25: the loss is not finite (NaN or infinity): lower optim.lr"),
    ("grad", "step 25: the gradient of features.conv2.weight is not finite (NaN or infinity), the loss is finite"),
])
def test_a_nonfinite_step_stops_the_run_naming_step_and_tensor(tmp_path, monkeypatch, what, message):
    monkeypatch.chdir(tmp_path)
    path = write_recipe(tmp_path, method={"name": "ann"})
    poison(monkeypatch, {25}, what)
    with pytest.raises(NonFiniteError) as e:
        launch(load_recipe(path), echo=lambda *_: None)
    assert str(e.value).startswith(message), str(e.value)
    _, found = mlflow_runs(tmp_path)
    assert [r.info.status for r in found] == ["FAILED"]
    (last,) = (tmp_path / "runs").glob("*/*/last.pt")
    state = checkpoint.load(last)  # the last good one: the end of epoch 1, all finite
    assert state["epoch"] == 1 and checkpoint.first_nonfinite(state["model"]) is None


@pytest.mark.slow
def test_a_diverging_run_exits_3_with_one_line(tmp_path, monkeypatch, capsys):
    """What a user saw: `-o optim.lr=1e30` ended in a FloatingPointError traceback."""
    monkeypatch.chdir(tmp_path)
    path = write_recipe(tmp_path, method={"name": "ann"})
    monkeypatch.setattr(sys, "argv", ["harness", "launch", str(path), "-o", "optim.lr=1e30"])
    with pytest.raises(SystemExit) as exit_info:
        run()
    err = capsys.readouterr().err  # (MLflow may log its database set-up first)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 3 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"error: {path}: step ") and "is not finite" in errors[0]
    _, found = mlflow_runs(tmp_path)
    assert [r.info.status for r in found] == ["FAILED"]


@pytest.mark.slow
def test_skip_nonfinite_skips_and_counts_then_gives_up_after_too_many_in_a_row(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_recipe(tmp_path, method={"name": "ann"}, optim={"skip_nonfinite": True, "max_skips_in_a_row": 3})
    poison(monkeypatch, {4, 5, 30})
    summary = launch(load_recipe(path), echo=lambda *_: None)
    client, _ = mlflow_runs(tmp_path)
    skipped = [m.value for m in client.get_metric_history(summary["mlflow_run_id"], "train/skipped_steps")]
    assert skipped == [2, 1]
    losses = [m.value for m in client.get_metric_history(summary["mlflow_run_id"], "train/loss")]
    assert all(v == v for v in losses)  # the skipped steps' NaN is not in the epoch's loss
    assert checkpoint.first_nonfinite(checkpoint.load(Path(summary["run_dir"]) / "last.pt")["model"]) is None

    poison(monkeypatch, set(), every_from=8)
    with pytest.raises(NonFiniteError, match=r"step 10: 3 steps in a row had a non-finite loss or gradient"):
        launch(load_recipe(path), echo=lambda *_: None)


# ------------------------------------------------------------------------------------------ DeepSpeed
requires_deepspeed = pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is None,
                                        reason="the deepspeed extra is not installed (EXTRAS=dev)")


@pytest.mark.slow
@requires_deepspeed
def test_deepspeed_resumes_mid_epoch_exactly_and_refuses_a_corrupted_part(tmp_path):
    """Under DeepSpeed the optimizer state lives in DeepSpeed's own files, which `last.pt` names with their
    checksums: a ZeRO-2 run preempted mid-epoch resumes to the uninterrupted weights, and a part with one byte
    changed is refused (exit 2, one line) before DeepSpeed unpickles it. (Each run is its own process: DeepSpeed
    keeps global state that one process cannot start twice.)"""
    path = write_recipe(tmp_path, optim={"epochs": 3}, engine={"threads": 1, "kind": "deepspeed"})
    command = [sys.executable, "-m", "harness.cli", "launch", str(path)]
    run_root = tmp_path / "runs" / "faults"
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (straight_dir,) = run_root.iterdir()
    stopped = launch_and_stop(command, tmp_path, run_root, checkpoints=2)
    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.output[-3000:]
    (run_dir,) = [p for p in run_root.iterdir() if p != straight_dir]
    state = checkpoint.load(run_dir / checkpoint.LAST)
    files, tag = state["deepspeed"]["files"], state["deepspeed"]["tag"]
    assert state["epoch_step"] > 0 and tag == f"epoch{state['epoch']}-step{state['step']}"
    assert files and all(name.startswith(f"{tag}/") for name in files)

    victim = sorted(files)[0]
    original = (run_dir / "deepspeed" / victim).read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    (run_dir / "deepspeed" / victim).write_bytes(bytes(data))
    refused = subprocess.run([*command, f"--resume={run_dir}"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert errors == [f"error: {run_dir / 'deepspeed'}: corrupted: file {victim} does not match the checksum "
                      "last.pt holds"]
    client, _ = mlflow_runs(tmp_path)
    assert client.get_run(state["mlflow_run_id"]).info.status == "KILLED"  # refused before the run was touched

    (run_dir / "deepspeed" / victim).write_bytes(original)
    resumed = subprocess.run([*command, f"--resume={run_dir}"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_final_state(straight_dir, run_dir)
