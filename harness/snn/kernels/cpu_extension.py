"""The CPU fused neuron (`csrc/dsr_neuron.cpp`), compiled with this machine's C++ compiler on first use.

torch's `cpp_extension.load` builds it once (about a minute) into torch's extension cache
(`$TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`; one entry per checkout), keyed by the source
and the flags, and loads the cached library afterwards (a fraction of a second); concurrent processes wait on
its lock.
`-ffp-contract=off`: the compiler must not fuse a multiply and an add (the reference rounds both);
`-fno-trapping-math`: masks such as `G * (xbar > V)` may be computed without a branch (so the loops vectorise;
  every value stays the IEEE result the reference computes: no reassociation, no contraction);
`-fopenmp`: ATen's `parallel_for` is inlined into the extension and runs serially without it.
"""

import hashlib
import logging
import sys
from pathlib import Path

logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime": not needed here
from torch.utils import cpp_extension  # noqa: E402

SOURCE = Path(__file__).parent / "csrc" / "dsr_neuron.cpp"
# one cache entry per checkout: torch rebuilds an entry whose build file names another source path, so two
# checkouts sharing one name would rebuild it in turn (a minute each time)
NAME = "harness_dsr_neuron_" + hashlib.sha256(str(SOURCE.resolve()).encode()).hexdigest()[:8]
FLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp"]

_module = None
_error: str | None = None


def load(verbose: bool = False):
    """The compiled module (building it if needed); raises what the build raised."""
    global _module
    if _module is None:
        built = any(Path(cpp_extension._get_build_directory(NAME, False)).glob(f"{NAME}*.so"))
        if not built:
            print(f"harness: compiling the fused DSR neuron for the CPU (once per checkout, about a minute) "
                  f"into {cpp_extension.get_default_build_root()}", file=sys.stderr, flush=True)
        _module = cpp_extension.load(NAME, [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                                     verbose=verbose)
    return _module


def status() -> tuple[bool, str]:
    """`(available, why not)`: tries to load (and build) the extension once."""
    global _error
    if _module is None and _error is None:
        try:
            load()
        except Exception as e:  # a missing compiler or headers: the plain loop runs instead
            _error = f"the C++ extension did not build ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return (_module is not None, _error or "")
