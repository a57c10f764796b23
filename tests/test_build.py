"""The compiled kernels are built (CI fails where they are not, unless the torch path was asked for),
and a user whose build failed hears it once, from rank 0: why, what it costs, and the fix (issue 21)."""
import re
import subprocess
import sys

import pytest

from conftest import ROOT, mpi_env, run_mpi
from hvd_distef import _kernels

FORCED = _kernels._forced_torch()
WARNING_START = "hvd_distef: the compiled kernels (cpp_ops) did not load"

#: trains three `ps` + blocksign steps with cpp_ops unimportable (as where it did not build), the
#: warnings recorded; prints "rank R: N" and each warning about the kernels
WITHOUT_EXTENSION = """
import sys, warnings
sys.modules["hvd_distef._cpp_ops"] = None  # `from . import _cpp_ops` raises ImportError
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    import torch, hvd_distef
    from mpi4py import MPI
    p = torch.nn.Parameter(torch.zeros(10))
    opt = hvd_distef.DistributedOptimizer(torch.optim.SGD([p], lr=0.1, momentum=0.9), named_parameters=[("p", p)],
                                          compression="blocksign", topology="ps")
    for _ in range(3):
        p.grad = torch.ones(10)
        opt.step()
mine = [str(w.message) for w in seen if "cpp_ops" in str(w.message)]
print(f"rank {MPI.COMM_WORLD.rank}: {len(mine)}", *mine, sep="\\n", flush=True)
"""


@pytest.mark.skipif(FORCED, reason=f"{_kernels.FORCE_TORCH_ENV} is set: the torch path was asked for")
def test_the_compiled_kernels_are_built():
    assert _kernels.compiled is not None, (
        f"cpp_ops did not load ({_kernels.import_error}): the CPU runs the torch path, tens of times slower. "
        f"Build it (`make install`, with a C++ compiler), or set {_kernels.FORCE_TORCH_ENV}=1 to test the torch "
        f"path alone")


def _run_alone(env_extra=None):
    env = {k: v for k, v in mpi_env().items() if k not in _kernels.RANK_ENVS and k != _kernels.FORCE_TORCH_ENV}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", WITHOUT_EXTENSION], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_a_missing_extension_is_said_once_with_the_reason_and_the_fix():
    proc = _run_alone()
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "rank 0: 1", proc.stdout  # once, though every step calls the kernels
    message = lines[1]
    assert message.startswith(WARNING_START), message
    assert "ImportError" in message or "ModuleNotFoundError" in message, message  # the reason
    assert "hvd_distef._cpp_ops" in message, message
    assert "slower" in message  # the cost
    assert "make install" in message and f"{_kernels.FORCE_TORCH_ENV}=1" in message  # the fix, and the way out


def test_no_word_where_the_torch_path_was_asked_for():
    proc = _run_alone({_kernels.FORCE_TORCH_ENV: "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["rank 0: 0"], proc.stdout


@pytest.mark.parametrize("ranks", [2, 3])
def test_only_rank_0_says_it(ranks):
    env = {k: v for k, v in mpi_env().items() if k != _kernels.FORCE_TORCH_ENV}
    proc = run_mpi(ranks, ["-c", WITHOUT_EXTENSION], env=env, timeout=120)
    counts = dict(re.findall(r"rank (\d+): (\d+)", proc.stdout))  # mpirun may join two ranks' lines
    assert counts == {"0": "1", **{str(r): "0" for r in range(1, ranks)}}, proc.stdout
    assert proc.stdout.count(WARNING_START) == 1


@pytest.mark.parametrize("environ,rank", [({}, None), ({"OMPI_COMM_WORLD_RANK": "2"}, 2), ({"PMI_RANK": "0"}, 0),
                                          ({"PMIX_RANK": "5"}, 5)])
def test_the_rank_before_mpi_starts_is_the_launchers(monkeypatch, environ, rank):
    monkeypatch.delitem(sys.modules, "mpi4py.MPI", raising=False)
    for name in _kernels.RANK_ENVS:
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert _kernels._world_rank() == rank
