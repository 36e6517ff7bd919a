"""Helpers the fault and distributed tests share: a digits recipe file, and a `harness launch` stopped by SIGTERM."""

import os
import signal
import subprocess
import time
from pathlib import Path

import yaml

CHECKPOINT = "last.pt"


def digits_recipe(tmp_path: Path, name: str, method: dict, base: dict, sections: dict) -> Path:
    """Write `<tmp_path>/<name>.yaml`: snn_convnet on the embedded digits, MLflow on a sqlite file and runs in
    tmp_path; `base` holds the caller's defaults per section (and `seed`), `sections` the test's changes."""
    recipe = {
        "name": name, "seed": base.get("seed", 0),
        "data": {"dataset": "digits", "batch_size": 64, "workers": 0, **base.get("data", {})},
        "model": {"backbone": "snn_convnet"},
        "method": method,
        "optim": {"name": "sgd", **base.get("optim", {})},
        "engine": dict(base.get("engine", {})),
        "track": {"experiment": base["experiment"], "output_dir": str(tmp_path / "runs"),
                  "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    for section, values in sections.items():
        recipe[section].update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def launch_and_stop(command: list[str], cwd: Path, run_root: Path, checkpoints: int = 1,
                    env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `command` (a `harness launch`), SIGTERM it once `checkpoints` last.pt files exist under `run_root`,
    wait for it; the finished process, with its combined output as `.output`."""
    proc = subprocess.Popen(command, cwd=cwd, env={**(env or os.environ), "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while len(list(run_root.glob(f"*/{CHECKPOINT}"))) < checkpoints:
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc
