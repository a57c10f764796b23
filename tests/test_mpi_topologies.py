"""The topologies of SPEC §3 under mpirun with 2, 3 and 4 ranks (see tests/mpi/check_topologies.py)."""
import pytest

from conftest import assert_case, cases_fixture

CASES = ["sharded_equals_ps", "ps_none_equals_torch_sgd", "tree_none_equals_ps", "ring_none_equals_ps",
         "majority_vote_matches_signum_simulation", "allgather_matches_one_way_error_feedback",
         "tree_descends_quadratic", "ring_descends_quadratic", "comm_stats_ps",
         "comm_stats_sharded", "comm_stats_ring", "comm_stats_tree", "comm_stats_allgather",
         "comm_stats_majority_vote", "sharded_bytes_near_spec_formula", "scalars_go_raw",
         "partial_sum_density_by_hop", "hierarchical_matches_node_worker_simulation",
         "hierarchical_one_rank_a_node_equals_sharded", "comm_stats_hierarchical", "hierarchical_none_equals_ps",
         "hierarchical_every_compressor", "hierarchical_checkpoint_takes_options_as_resolved"]


results = cases_fixture("check_topologies.py", ranks=(2, 3, 4))


@pytest.mark.parametrize("case", CASES)
def test_topology(results, case):
    assert_case(results, case)
