"""Horovod's optimizer tests (test/parallel/test_torch.py) ported to our class, in the `allreduce`+none
and `ps`+blocksign flavours, under mpirun with 2 and 3 ranks (see tests/mpi/check_horovod_port.py)."""
import pytest

from conftest import assert_case, cases_fixture, mpi_env

TESTS = ["broadcast_state", "broadcast_state_options", "broadcast_state_no_grad", "force_allreduce", "names",
         "dynamic_requires_grad", "gradient_clipping", "synchronize_step_warning", "optimizer_process_sets",
         "gradient_aggregation"]


# hvd.add_process_set needs Horovod's dynamic process sets
results = cases_fixture("check_horovod_port.py", env=dict(mpi_env(), HOROVOD_DYNAMIC_PROCESS_SETS="1"))


@pytest.mark.parametrize("flavour", ["allreduce", "ps"])
@pytest.mark.parametrize("test", TESTS)
def test_ported(results, test, flavour):
    assert_case(results, f"{test}[{flavour}]")
