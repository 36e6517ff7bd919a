"""One step-bench configuration in a process of its own: `python -m harness.bench.worker '<StepConfig JSON>'`.

Prints the row as one JSON line on stdout (exit 0); bad input (a `HarnessError`) as `{"error": "..."}` (exit 2).
`harness.bench.step.measure_in_subprocess` starts it, so that the peak resident set size it reports belongs to
that configuration alone.
"""

import json
import sys

from harness.bench.memory import keep_freed_memory
from harness.bench.step import StepConfig, measure
from harness.errors import HarnessError


def main(argv: list[str]) -> int:
    fields = json.loads(argv[0])
    config = StepConfig(**{**fields, "input_shape": tuple(fields["input_shape"])})
    keep_freed_memory()  # the worker runs on the CPU (on CUDA the bench measures in its own process)
    try:
        row = measure(config)
    except HarnessError as e:
        print(json.dumps({"error": str(e)}))
        return 2
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
