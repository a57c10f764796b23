# hvd_distef: `make demo` runs the main job, `make test` the test suite; both install what they need.
PY      ?= .venv/bin/python
MPIEXEC ?= mpirun
NP      ?= 2
PYTEST_ARGS ?=

SLURM_DIR ?= /tmp/hvd_distef_slurm

.PHONY: install test demo experiments clean slurm-up slurm-down

install:
	@bash scripts/install.sh

test: install
	$(PY) -m pytest $(PYTEST_ARGS) tests

demo: install
	MPIEXEC=$(MPIEXEC) NP=$(NP) bash launch/demo.sh

# the authors' six claims at this machine's scale (about 30 minutes on 2 cores) -> EXPERIMENTS.md
experiments: install
	$(PY) -m hvd_distef.experiments all --quick

slurm-up: install
	bash launch/slurm/local_cluster.sh up $(SLURM_DIR)

slurm-down:
	bash launch/slurm/local_cluster.sh down $(SLURM_DIR)

clean:
	rm -rf build *.egg-info runs .pytest_cache
