# hvd_distef: `make demo` runs the main job, `make test` the test suite; both install what they need.
PY      ?= .venv/bin/python
MPIEXEC ?= mpirun
NP      ?= 2
PYTEST_ARGS ?=

SLURM_DIR ?= /tmp/hvd_distef_slurm

.PHONY: install test demo experiments bench bench-record plan plan-validation clean slurm-up slurm-down

install:
	@bash scripts/install.sh

test: install
	$(PY) -m pytest $(PYTEST_ARGS) tests

demo: install
	MPIEXEC=$(MPIEXEC) NP=$(NP) bash launch/demo.sh

# the authors' six claims at this machine's scale (about 30 minutes on 2 cores) -> EXPERIMENTS.md
experiments: install
	$(PY) -m hvd_distef.experiments all --quick

# every benchmark of BENCHMARKS.md (hours on 2 cores; the emulated links need root), then BENCHMARKS.md
bench: install
	$(PY) benchmarks/record.py --run

# BENCHMARKS.md from the results files in benchmarks/results/ as they are
bench-record: install
	$(PY) benchmarks/record.py

# the step-time model's table for ResNet-50 (measures forward/backward and the optimizer's passes here)
PLAN_ARGS ?= --model resnet50 --ranks 8 64 512 1024 --ranks-per-node 8 --link 10gbit,25gbit,100gbit
plan: install
	$(PY) -m hvd_distef.plan $(PLAN_ARGS) --plot runs/plan.png

# the model against benchmarks/results/netem_{step,nodes,one_node}.json -> benchmarks/results/plan_validation.json
plan-validation: install
	$(PY) benchmarks/plan_validation.py

slurm-up: install
	bash launch/slurm/local_cluster.sh up $(SLURM_DIR)

slurm-down:
	bash launch/slurm/local_cluster.sh down $(SLURM_DIR)

clean:
	rm -rf build *.egg-info runs .pytest_cache
