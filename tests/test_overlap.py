"""Overlap (hvd_distef/buckets.py): bucketed exchange during backward equals the fused step bit for
bit on every topology, and a step that cannot keep it changes nothing (see tests/mpi/check_overlap.py)."""
import pytest

from conftest import assert_case, cases_fixture
from hvd_distef import buckets

CASES = ["overlap_equals_the_fused_step_every_topology", "changes_after_backward_are_redone",
         "grad_scaler_under_overlap", "nonfinite_gradient_raises_and_changes_nothing",
         "zero_grad_between_backward_and_step_on_every_rank_redoes_the_step", "buckets_go_out_during_backward",
         "checkpoint_resumes_under_overlap", "a_failure_on_one_rank_raises_everywhere_and_changes_nothing"]


results = cases_fixture("check_overlap.py")


@pytest.mark.parametrize("case", CASES)
def test_overlap(results, case):
    assert_case(results, case)


def test_buckets_follow_backward_order_and_cap():
    mib = 2**20 // 4  # float32 elements per MiB
    # last parameters first; a bucket closes before the parameter that would overflow it
    assert buckets.plan([mib, mib, mib // 2, mib // 2], 1.0) == [(2, 4), (1, 2), (0, 1)]
    # a parameter larger than the cap gets a bucket of its own
    assert buckets.plan([10, 3 * mib, 10], 1.0) == [(2, 3), (1, 2), (0, 1)]
    assert buckets.plan([10, 20, 30], 1.0) == [(0, 3)]
    assert buckets.plan([10, 20, 30], None) == [(0, 3)]
    assert buckets.plan([], 25.0) == []
    with pytest.raises(ValueError, match="bucket_cap_mb must be positive"):
        buckets.plan([10], 0.0)
