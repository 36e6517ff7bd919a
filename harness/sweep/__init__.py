"""`harness sweep`: a search over recipe fields, run as Ray Tune trials; each trial one `launch`, one MLflow run.

A sweep file (YAML, schema `SweepSpec` in `spec.py`):
```
name: mnist5k_methods
recipe: ../quickstart.yaml            # the base recipe, relative to the sweep file
set: {optim.epochs: 3}                # dotted overrides for every trial
space:                                # axes shared by every variant
  seed: [0, 1]                        #   a list is a grid axis
  optim.lr: {loguniform: [1.0e-3, 0.1]}   # a distribution is drawn once per trial
variants:                             # named alternatives, each with its own overrides and axes
  ann:    {set: {method: {name: ann}}}
  dsr_if: {set: {method: {name: dsr, neuron: if}}, space: {method.T: [1, 2, 4, 8]}}
num_samples: 1                        # draws per grid point
scheduler: {kind: asha, metric: test/acc1, mode: max, grace_period: 1}
resources: {cpu: 1, gpu: 0}           # per trial
max_concurrent: 2
retries: 1                            # re-runs of a trial that failed or whose worker died, from its
                                      #   last checkpoint (Tune's FailureConfig.max_failures)
storage: ray_results                  # Tune's experiment folders (a shared path on a cluster)
```
A tuned sweep (`tuning` set; `tuned.py`) gives every method the same tuning budget, then trains what it chose:
```
tune: {optim.lr: {loguniform: [0.01, 0.3]}}       # search space shared by every variant
variants:
  dsr_if: {set: {...}, space: {method.T: [1, 2, 4, 8]},          # space: the grid of cells
           tune: {method.vth.init: {loguniform: [0.5, 8]}}}      # the variant's own knobs
tuning: {trials: 8, holdout: 0.2}    # per cell (variant x grid point): 8 configurations, ASHA within the cell
                                     #   on val/* of a seeded 20% held out from the training data
final: {seeds: [0, 1, 2]}            # each cell's choice on the whole training data, tested, once per seed
```
Methods are a discriminated union in the recipe, so switching `method.name` needs a whole method section:
a dotted key whose value is a mapping replaces that section, which is what variants are for. A variant
without `T` (the ANN) simply has no `method.T` axis: it runs once per seed, not once per T.

The parts: `spec` (the file's schema), `plan` (the trials it expands to, what `--dry-run` lists), `trial`
(the Tune trainable: one `launch`, one MLflow run, its `worker.json`), `driver` (parent run, Ray, Tune,
how runs end, SIGINT/SIGTERM, `--resume`) and `tuned` (a tuned sweep's two stages, ASHA per cell, the choice).
"""

from harness.sweep.driver import Sweep, connect_ray, run_sweep
from harness.sweep.plan import Trial, describe, expand
from harness.sweep.spec import (
    Distribution,
    ResourcesConfig,
    SchedulerConfig,
    SweepError,
    SweepSpec,
    Variant,
    load_sweep,
)
from harness.sweep.trial import run_trial

__all__ = [
    "Distribution",
    "ResourcesConfig",
    "SchedulerConfig",
    "Sweep",
    "SweepError",
    "SweepSpec",
    "Trial",
    "Variant",
    "connect_ray",
    "describe",
    "expand",
    "load_sweep",
    "run_sweep",
    "run_trial",
]
