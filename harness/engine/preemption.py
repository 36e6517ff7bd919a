"""Preemption: a signal asks a run to stop at the next step boundary, with a checkpoint of that step.

SIGTERM (a scheduler preempting the job, `scancel`, Kubernetes, torchrun forwarding either) and SIGUSR1
(SLURM's `--signal=USR1@<seconds>` warning before the time limit) only set a flag: the handler never raises,
so no checkpoint or MLflow write is cut in half. After every optimizer step the loop passes the flag to the
engine, whose one per-step all-reduce makes every process agree on it; they then write `last.pt` of that
exact step (mid-epoch if need be), end the MLflow run KILLED with tag `stopped`, and exit with
`PREEMPTED_EXIT_CODE`: 75 (`EX_TEMPFAIL`, "try again"), so a job script can tell "resume me" from success
(0), a crash (1), bad input (2) and a numerical fault (3). `harness launch ... --resume` continues at the
same step with the same data order.

A second SIGTERM while the run is still on its way to the step boundary is handed to the handler that was
there before (the CLI's: exit at once, KILLED, 143; in a distributed job, the teardown error), so an
impatient operator or a launcher's grace period still ends the process. Only the main thread can take
signals: a run launched from another thread (a Ray Tune trial) is stopped by its own scheduler instead.
"""

import signal
import threading
from types import FrameType

PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """The run stopped at a step boundary on request and wrote its checkpoint; exits with code 75."""

    def __init__(self, message: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message


class StopRequest:
    """While inside: SIGTERM and SIGUSR1 set `signum` instead of ending the process (main thread only)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "none"

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            return
        previous = self._previous.get(signum)
        if signum == signal.SIGTERM and callable(previous):  # asked twice: end now, as before
            previous(signum, frame)
        elif signum == signal.SIGTERM:
            raise SystemExit(128 + signum)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> bool:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
        return False
