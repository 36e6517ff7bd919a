# Two entry points for a fresh machine (README.md): `make quickstart` and `make test`.
# Both create .venv, install the Debian packages FFCV needs (as root or with sudo) and the project with every
# extra, pinned by requirements.lock; `make test` also installs SLURM and munge for the cluster tests.
# EXTRAS=dev skips ffcv/deepspeed/dvs/peer and the Debian packages (the SLURM tests then skip, saying why).
PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= dev,ffcv,deepspeed,dvs,peer
export DS_BUILD_OPS ?= 0

.PHONY: install system-deps quickstart test test-fast lint fair fair-table

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Debian packages (.ci/system-deps.sh): FFCV's libraries for every target, SLURM + munge for `make test`;
# none with EXTRAS=dev.
FULL := $(findstring ffcv,$(EXTRAS))
system-deps:
	@test -z "$(FULL)" || bash .ci/system-deps.sh ffcv

comma := ,
INSTALLED = $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

install: $(INSTALLED)

# Reinstalled only when the pins or the project's metadata change (or with other EXTRAS).
$(INSTALLED): pyproject.toml requirements.lock | $(VENV)/bin/python
	@$(MAKE) --no-print-directory system-deps
	$(VENV)/bin/python -m pip install -q -c requirements.lock -e ".[$(EXTRAS)]"
	@case ",$(EXTRAS)," in *,ffcv,*) $(VENV)/bin/python -m pip install -q --no-deps -c requirements.lock ffcv ;; esac
	@case ",$(EXTRAS)," in *,peer,*) $(VENV)/bin/python -m pip install -q --no-deps -c requirements.lock spikingjelly ;; esac
	$(VENV)/bin/python -m harness.snn.kernels  # compiles the CPU fused DSR neuron once (about 30 s), not in a run
	@touch $@

quickstart: install
	$(VENV)/bin/harness launch recipes/quickstart.yaml

test: install
	@test -z "$(FULL)" || bash .ci/system-deps.sh cluster  # tests/test_clusters.py starts a SLURM cluster
	$(VENV)/bin/python -m pytest

test-fast: install  # the inner loop: everything but the tests that start processes, Ray, torchrun or train for real
	$(VENV)/bin/python -m pytest -m "not slow"

lint: install
	$(VENV)/bin/ruff check harness tests

# The fair method comparison (README "Comparing methods fairly"): the tuned sweep, then its table and plots.
# `make fair-table SWEEP=<sweep id>` redraws them from the MLflow runs of a finished sweep.
# The footnotes give the measured diagnosis of rows below what their paper leads one to expect (issue 14's note).
FAIR = --experiment mnist5k-fair --sweep $(SWEEP)
FAIR_FOOTNOTES = \
	--footnote "dsr_if=every row reads out analog (no output neuron). DSR's paper network, readout: spikes, with \
the cells' chosen settings (3 seeds, outside the sweep): T=1 93.67 ± 0.64, T=2 94.27 ± 0.06: its IF output rate \
takes only T+1 values." \
	--footnote "qcfs=below its T=2 and T=4 rows at T=1 (chosen L=4 > T) and T=8 (chosen L=4 < T; one seed at 94.4): \
QCFS converts exactly at T=L (Bu et al. 2022) and the search space offered L in {2, 4, 8, 16}. The chosen lambda \
and learning rate with L=T (3 seeds, outside the sweep): T=1 96.93 ± 0.38, T=8 97.20 ± 0.69."
FAIR_ROWS = --rows variant,readout $(FAIR_FOOTNOTES)
fair: install
	$(VENV)/bin/harness sweep recipes/sweeps/mnist5k_fair.yaml
	$(MAKE) --no-print-directory fair-table SWEEP=$$(basename $$(ls -d ray_results/mnist5k_fair-* | tail -1))

fair-table: install
	@test -n "$(SWEEP)" || { echo "usage: make fair-table SWEEP=<sweep id> (a folder name under ray_results/)"; exit 2; }
	$(VENV)/bin/harness table $(FAIR) $(FAIR_ROWS) --output results/tables/mnist5k_fair.md
	$(VENV)/bin/harness table $(FAIR) $(FAIR_ROWS) --format latex --output results/tables/mnist5k_fair.tex
	$(VENV)/bin/harness table $(FAIR) --rows variant,readout --metric efficiency/energy_uj --precision 3 \
		--output results/tables/mnist5k_fair_energy_uj.md
	$(VENV)/bin/harness plot $(FAIR) --series variant --output results/mnist5k_fair.png
	$(VENV)/bin/harness plot $(FAIR) --series variant --curves --output results/mnist5k_fair_curves.png
