"""SPEC §1 under mpirun with 2 and 3 ranks: `ps` against an independent reference, the virtual
iterate, `allreduce` against torch's SGD, resume, byte counters (see tests/mpi/check_core.py)."""
import pytest

from conftest import assert_case, run_cases

CASES = ["ps_blocksign_nesterov_matches_reference", "ps_blocksign_heavy_ball_matches_reference",
         "ps_sign_no_momentum_matches_reference", "ps_none_matches_reference", "virtual_iterate_identity",
         "allreduce_matches_torch_sgd", "resume_ps_blocksign", "resume_ps_randomk", "resume_allreduce",
         "comm_stats_match_formulas", "backward_passes_sum"]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"np{n}")
def results(request, tmp_path_factory):
    return run_cases(request.param, "check_core.py", tmp_path_factory)


@pytest.mark.parametrize("case", CASES)
def test_core(results, case):
    assert_case(results, case)
