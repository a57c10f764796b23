"""The step's fast paths (issue 21, item 9) under mpirun with 1, 2 and 3 ranks (see
tests/mpi/check_step_paths.py): identity compression keeps both errors exactly zero, sends d itself
and equals averaged Nesterov SGD by hand on every error-feedback topology; a loaded non-zero error
is still used; fp16's fused error steps equal the error step written out; allreduce at one rank."""
import pytest

from conftest import assert_case, cases_fixture

CASES = ["identity_feedback_is_averaged_sgd_by_hand", "identity_sends_d_itself_and_skips_the_memory",
         "loaded_nonzero_error_is_used", "fp16_feedback_is_the_generic_step", "allreduce_unscales_at_one_rank"]


results = cases_fixture("check_step_paths.py", ranks=(1, 2, 3))


@pytest.mark.parametrize("case", CASES)
def test_step_paths(results, case):
    assert_case(results, case)
