# hvd_distef: `make demo` runs the main job, `make test` the test suite; both install what they need.
PY      ?= .venv/bin/python
MPIEXEC ?= mpirun
NP      ?= 2
PYTEST_ARGS ?=

.PHONY: install test demo clean

install:
	@bash scripts/install.sh

test: install
	$(PY) -m pytest $(PYTEST_ARGS) tests

demo: install
	MPIEXEC=$(MPIEXEC) NP=$(NP) bash launch/demo.sh

clean:
	rm -rf build *.egg-info runs .pytest_cache
