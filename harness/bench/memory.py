"""Peak memory of the steps a bench times, over what was held before them.

`PeakMemory(device)` records a baseline when made (after the model and the batch are built) and, at `peak_mb()`,
the highest memory since, minus that baseline, in MiB:
  - CUDA: `torch.cuda.max_memory_allocated` (the peak statistics reset at the baseline);
  - CPU: the process's peak resident set size (Linux `VmHWM`, reset at the baseline by writing 5 to
    `/proc/self/clear_refs`), so the caller runs one configuration per process (`harness.bench.worker`).
    Where the peak cannot be reset (not Linux), `peak_mb()` is None.
"""

import ctypes
import ctypes.util
import gc
import re
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.M).group(1))


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc's allocator reuse freed memory instead of unmapping it: no `mmap` for large blocks, no trimming of
    the heap (`mallopt`). A CPU bench then times memory traffic on warm pages, as a caching allocator (PyTorch's
    CUDA one) gives a GPU, not the page faults of fresh 32 MiB+ mappings. Peak RSS still counts what is in use at
    the peak. False where the C library is not glibc (nothing changed)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**30 - 1))
    except (OSError, AttributeError):
        return False


class PeakMemory:
    """Baseline now; `peak_mb()`: the peak since, over the baseline (module docstring)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(device)
            self.device = device
            self.baseline = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.available = True
        else:
            self.available = _reset_peak_rss()
            self.baseline = _status_kib("VmRSS") * 1024 if self.available else 0

    def peak_mb(self) -> float | None:
        if not self.available:
            return None
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.baseline) / 2**20
        return (_status_kib("VmHWM") * 1024 - self.baseline) / 2**20
