"""Shared test helpers: launching scripts under mpirun with a timeout, and reading their results."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MPI_DIR = Path(__file__).resolve().parent / "mpi"
MPI_TIMEOUT = int(os.environ.get("HVD_DISTEF_TEST_MPI_TIMEOUT", "240"))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped, saying why, where torch sees no GPU."""
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU (torch.cuda.is_available() is False); scripts/gpu_check.sh "
                                   "runs the cuda tests on a GPU machine")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def mpi_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", PYTHONPATH=str(ROOT))
    return env


def run_mpi(np_, argv, timeout=MPI_TIMEOUT, check=True, env=None):
    """Run ``python argv...`` on ``np_`` ranks; a hang fails after ``timeout`` seconds."""
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun is not installed (run `make install`)")
    cmd = ["mpirun", "-np", str(np_), "--oversubscribe", "--timeout", str(timeout),
           sys.executable, *map(str, argv)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env or mpi_env(), capture_output=True, text=True, timeout=timeout + 30)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def run_cases(np_, script, tmp_path_factory, *args, env=None):
    """Run an MPI script that checks many cases in one launch; return {case: {"ok", "detail"}}."""
    out = tmp_path_factory.mktemp(f"{Path(script).stem}-np{np_}") / "results.json"
    run_mpi(np_, [MPI_DIR / script, "--out", out, *args], env=env)
    return json.loads(out.read_text())


def cases_fixture(script, ranks=(2, 3), env=None):
    """A module fixture that runs the MPI script ``script`` once per rank count in ``ranks`` (test ids
    np2, np3, ...) and gives its {case: {"ok", "detail"}}."""
    @pytest.fixture(scope="module", params=list(ranks), ids=lambda n: f"np{n}")
    def results(request, tmp_path_factory):
        return run_cases(request.param, script, tmp_path_factory, env=env)
    return results


def assert_case(results, case):
    assert case in results, f"case {case} did not run; ran {sorted(results)}"
    assert results[case]["ok"], results[case]["detail"]
