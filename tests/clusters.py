"""Real clusters on this machine for tests/test_clusters.py: an MLflow tracking server, a one-node SLURM cluster
and a two-node Ray cluster, each started from its real daemons in a temporary folder.

Every process a cluster starts, directly or through its daemons (slurmstepd, job steps, raylets, Ray workers),
carries the environment variable `HARNESS_TEST_CLUSTER=<that cluster's folder>`. On the way out, whatever the
test did, `end_processes` finds the processes that carry it and ends them by their pids: SIGTERM, then SIGKILL
for those still alive after `GRACE_S`. Nothing is left running and nothing outside the folder is touched (no
`ray stop`, which would end every Ray on the machine; no system munge or slurm service).

`unavailable_reason()` functions say why a cluster cannot start here (a missing program, not root), so that
the tests skip with that reason instead of failing.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from harness import track
from harness.engine.distributed import free_port

MARKER = "HARNESS_TEST_CLUSTER"
GRACE_S = 15
BIN = Path(sys.executable).parent  # the venv's mlflow, ray, harness


def marked_env(folder: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this environment) with the venv first on PATH and the marker of the cluster in `folder`."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env[MARKER] = str(folder)
    return env


def processes_with(variable: str, value: str) -> list[psutil.Process]:
    """The live processes (other than this one) whose environment has `variable=value`."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(variable) == value:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def marked_processes(folder: Path) -> list[psutil.Process]:
    """The live processes whose environment carries the marker of the cluster in `folder`."""
    return processes_with(MARKER, str(folder))


def job_processes(job_id: str) -> list[psutil.Process]:
    """The live processes of SLURM job `job_id` (its batch script and steps: SLURM_JOB_ID in their environment)."""
    return processes_with("SLURM_JOB_ID", job_id)


def end_processes(folder: Path) -> list[int]:
    """End every process of the cluster in `folder` by its pid; the pids that needed SIGKILL."""
    procs = marked_processes(folder)
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=GRACE_S)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=GRACE_S)
    return [p.pid for p in alive]


def wait_until(ready: Callable[[], bool], timeout_s: float, what: str, log: Path | None = None) -> None:
    """Poll `ready` until it is true; after `timeout_s`, fail naming `what` with the tail of `log`."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.is_file() else ""
            raise TimeoutError(f"{what}: not ready after {timeout_s:.0f} s\n{tail}")
        time.sleep(0.5)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _missing(*programs: str) -> list[str]:
    return [p for p in programs if shutil.which(p) is None and not (BIN / p).exists()]


# ---------------------------------------------------------------------------------------------------- MLflow


class MlflowServer:
    """`mlflow server` on 127.0.0.1:`port`, its runs in `<folder>/mlflow.db` and its artifacts (proxied: clients
    upload through the server) in `<folder>/artifacts`, in a process group of its own (it starts workers) that
    `kill` ends at once (SIGKILL: a server that goes away); `start` again brings it back on the same port."""

    def __init__(self, folder: Path, port: int):
        self.folder, self.port, self.proc = folder, port, None
        self.uri = f"http://127.0.0.1:{port}"
        folder.mkdir(parents=True, exist_ok=True)

    def start(self, timeout_s: float = 240) -> None:
        command = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
                   "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", "1"]
        log = self.folder / "mlflow-server.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(command, env=marked_env(self.folder), stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode})\n{log.read_text()[-3000:]}")
            try:
                track.check_reachable(self.uri)
                return True
            except track.TrackingUnreachable:
                return False

        wait_until(up, timeout_s, "mlflow server", log)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)
            self.proc = None


@contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """A running `MlflowServer` in `folder` on a free port; yields its http:// URI."""
    server = MlflowServer(folder, free_port())
    try:
        server.start()
        yield server.uri
    finally:
        server.kill()
        end_processes(folder)  # anything of it that left its process group


# ----------------------------------------------------------------------------------------------------- SLURM

SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue")


def slurm_unavailable_reason() -> str | None:
    missing = _missing(*SLURM_PROGRAMS)
    if missing:
        return (f"SLURM is not installed ({', '.join(missing)} missing): `bash .ci/system-deps.sh` installs "
                "slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        return "the test SLURM cluster runs its daemons as root (SlurmUser=root), and this is not root"
    return None


SLURM_CONF = """\
ClusterName=harnesstest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge.socket
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
JobRequeue=1
ReturnToService=2
KillWait=60
MinJobAge=600
SchedulerParameters=sched_interval=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    """A running one-node SLURM cluster; `env` holds `SLURM_CONF`, which every client command needs."""

    folder: Path
    env: dict[str, str]

    def run(self, *command: str, **kwargs) -> str:
        done = subprocess.run(command, env=kwargs.pop("env", self.env), capture_output=True, text=True, timeout=60,
                              **kwargs)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: exit {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def sbatch(self, *args: str, env: dict[str, str], cwd: Path) -> str:
        """Submit; the job id. `env` is the submitter's environment (sbatch exports it to the job)."""
        out = self.run("sbatch", "--parsable", *args, env={**env, "SLURM_CONF": self.env["SLURM_CONF"]}, cwd=cwd)
        return out.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        line = self.run("scontrol", "show", "job", "-o", job_id).strip()
        return dict(item.split("=", 1) for item in line.split() if "=" in item)

    def wait_for_job(self, job_id: str, condition: Callable[[dict[str, str]], bool], timeout_s: float, what: str,
                     log: Path | None = None) -> dict[str, str]:
        """Poll `job` until `condition` holds for it; that state of the job."""
        job = {}

        def holds() -> bool:
            job.update(self.job(job_id))
            return condition(job)

        wait_until(holds, timeout_s, f"SLURM job {job_id}: {what}", log)
        return job

    def wait_for_requeue(self, job_id: str, restarts: int, timeout_s: float, log: Path | None = None) -> None:
        """Wait until the job has been requeued `restarts` times and is back in the queue (a requeue passes through
        COMPLETING and REQUEUED) and its previous run's processes have ended, then let it start in 3 s: SLURM
        holds a requeued job pending (Reason=BeginTime; 121 s seen with 22.05), which a cluster with a queue does
        not notice and a test should not wait for. Not at once: a requeue revokes the job's credential, and a
        restart within the same second carries a credential slurmd takes for the revoked one ("Killing
        non-startable batch job: Job credential revoked", seen when the batch script requeued itself)."""
        job = self.wait_for_job(job_id, lambda j: j["Restarts"] == str(restarts)
                                and j["JobState"] not in ("COMPLETING", "REQUEUED"), timeout_s, f"requeue {restarts}",
                                log)
        wait_until(lambda: not job_processes(job_id), timeout_s, f"the processes of SLURM job {job_id} to end", log)
        if job["JobState"] == "PENDING" and job.get("Reason") == "BeginTime":
            self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now+3")

    def wait_for_state(self, job_id: str, states: set[str], timeout_s: float, log: Path | None = None) -> str:
        return self.wait_for_job(job_id, lambda j: j["JobState"] in states, timeout_s, f"to reach {sorted(states)}",
                                 log)["JobState"]


@contextmanager
def slurm_cluster(folder: Path, cpus: int = 2) -> Iterator[SlurmCluster]:
    """munged, slurmctld and slurmd in the foreground, their key, sockets, state, spool and logs in `folder`."""
    for sub in ("state", "spool", "log"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    conf = folder / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, folder=folder, cpus=cpus, ctld_port=free_port(),
                                      slurmd_port=free_port()))
    env = marked_env(folder)
    env["SLURM_CONF"] = str(conf)
    daemons = [
        ["munged", "--foreground", "--force", f"--socket={folder}/munge.socket", f"--key-file={key}",
         f"--pid-file={folder}/munged.pid", f"--log-file={folder}/log/munged.log", f"--seed-file={folder}/munge.seed"],
        ["slurmctld", "-D", "-f", str(conf)],
        ["slurmd", "-D", "-f", str(conf)],
    ]
    cluster = SlurmCluster(folder, env)
    try:
        for command in daemons:
            with open(folder / "log" / f"{command[0]}.out", "w") as out:
                subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            if command[0] == "munged":
                wait_until(lambda: (folder / "munge.socket").exists(), 30, "munged", folder / "log" / "munged.log")

        def node_idle() -> bool:
            try:
                return cluster.run("sinfo", "-h", "-o", "%t").strip() == "idle"
            except (RuntimeError, subprocess.TimeoutExpired):
                return False

        wait_until(node_idle, 60, "the SLURM node to be idle", folder / "log" / "slurmctld.log")
        yield cluster
    finally:
        try:
            subprocess.run(["scancel", "--full", "--quiet", "--partition=debug"], env=env, timeout=30,
                           capture_output=True)
        except (OSError, subprocess.TimeoutExpired):
            pass
        end_processes(folder)


# ------------------------------------------------------------------------------------------------------- Ray


def ray_unavailable_reason() -> str | None:
    missing = _missing("ray")
    return f"Ray's CLI is not installed ({missing[0]})" if missing else None


@dataclass
class RayCluster:
    """A running Ray cluster of a head and a worker node, one CPU each, all on loopback."""

    folder: Path
    address: str  # GCS host:port, for `ray.init(address)` and `harness sweep --address`
    client_address: str  # ray://host:port (Ray Client)
    dashboard: str  # http://host:port (jobs API: `ray job submit --address`)
    node_ids: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def _alive_node_ids(address: str, env: dict[str, str]) -> list[str]:
    script = (f"import json, ray; ray.init(address={address!r}, logging_level='ERROR'); "
              "print(json.dumps(sorted(n['NodeID'] for n in ray.nodes() if n['Alive'])))")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"listing the nodes of {address}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextmanager
def ray_cluster(folder: Path, env: dict[str, str] | None = None) -> Iterator[RayCluster]:
    """`ray start --head` and `ray start --address` (a second node on this machine), each with one CPU; the
    session files in a short temporary folder (Ray's socket paths must stay under 108 characters)."""
    folder.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    env = marked_env(folder, env)
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    port, client_port, dashboard_port = free_port(), free_port(), free_port()
    address = f"127.0.0.1:{port}"
    log = folder / "ray-start.log"
    head = ["ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "1",
            "--num-gpus", "0", "--ray-client-server-port", str(client_port), "--include-dashboard", "true",
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--temp-dir", str(temp),
            "--disable-usage-stats"]
    worker = ["ray", "start", "--address", address, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
              "--num-gpus", "0"]
    cluster = RayCluster(folder, address, f"ray://127.0.0.1:{client_port}", f"http://127.0.0.1:{dashboard_port}",
                         env=env)
    try:
        with open(log, "w") as out:
            for command in (head, worker):
                done = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=180)
                if done.returncode != 0:
                    raise RuntimeError(f"{' '.join(command)}: exit {done.returncode}\n{log.read_text()[-3000:]}")

        def two_nodes() -> bool:
            cluster.node_ids = _alive_node_ids(address, env)
            return len(cluster.node_ids) == 2

        wait_until(two_nodes, 120, "both Ray nodes to be alive", log)
        wait_until(lambda: _answers(f"{cluster.dashboard}/api/version"), 120, "the Ray dashboard (jobs API)", log)
        yield cluster
    finally:
        end_processes(folder)
        shutil.rmtree(temp, ignore_errors=True)
