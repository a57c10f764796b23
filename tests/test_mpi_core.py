"""SPEC §1 under mpirun with 2 and 3 ranks: `ps` against an independent reference, the virtual
iterate on every topology that keeps all its errors, `allreduce` against torch's SGD, resume, `ps`'s
byte counters (see tests/mpi/check_core.py)."""
import pytest

from conftest import assert_case, cases_fixture

CASES = ["ps_blocksign_nesterov_matches_reference", "ps_blocksign_heavy_ball_matches_reference",
         "ps_sign_no_momentum_matches_reference", "ps_none_matches_reference",
         "ps_error_decay_matches_reference", "virtual_iterate_identity_ps", "virtual_iterate_identity_sharded",
         "virtual_iterate_identity_allgather", "allreduce_matches_torch_sgd", "resume_ps_blocksign",
         "resume_ps_randomk", "resume_allreduce", "comm_stats_match_formulas", "backward_passes_sum"]


results = cases_fixture("check_core.py")


@pytest.mark.parametrize("case", CASES)
def test_core(results, case):
    assert_case(results, case)
