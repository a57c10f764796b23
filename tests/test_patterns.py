"""Training patterns beyond one model and one optimizer (tests/mpi/check_patterns.py), and how a job
ends when one rank raises, is slow, or the script ends mid-step (tests/mpi/fault_rank_dies.py)."""
import re

import pytest

from conftest import MPI_DIR, assert_case, cases_fixture, run_mpi
from test_faults import JOB_TIMED_OUT

CASES = ["two_optimizers_with_overlap_equal_the_plain_loop", "gradients_set_by_hand_with_a_masked_first_batch",
         "sgd_subclass_with_its_own_step_is_refused", "backward_on_one_rank_under_overlap_is_an_error_on_every_rank",
         "options_are_aligned_by_broadcast_or_refused_at_the_step", "one_checkpoint_file_for_the_job"]


results = cases_fixture("check_patterns.py")


@pytest.mark.parametrize("case", CASES)
def test_pattern(results, case):
    assert_case(results, case)


@pytest.mark.parametrize("topology", ["ps", "allreduce"])
def test_uncaught_exception_on_one_rank_ends_the_job(topology):
    """Rank 1 of 3 raises at step 3 (timeout_s=600): the job ends with rank 1's traceback, long before
    the bound, the other ranks ended by MPI_Abort."""
    proc = run_mpi(3, [MPI_DIR / "fault_rank_dies.py", "raise", topology], check=False, timeout=90)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "unreachable" not in out and JOB_TIMED_OUT not in out, out[-3000:]
    assert "RuntimeError: a data error on rank 1" in out, out[-3000:]
    assert "hvd_distef: rank 1: uncaught RuntimeError; aborting the job" in out, out[-3000:]
    assert "no progress for" not in out, out[-3000:]


def test_slow_rank_is_warned_about_and_the_job_goes_on():
    """Rank 2 of 3 sleeps 4 s before step 3 (stall_warning_s=1): rank 0 warns, naming rank 2 and the
    collective it waits in; training finishes."""
    proc = run_mpi(3, [MPI_DIR / "fault_rank_dies.py", "slow", "ps"], check=False, timeout=90)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "training finished" in out, out[-3000:]
    assert re.search(r"hvd_distef: rank 0 has waited \d+ s in MPI [\w ()]+; ranks in none of our collectives "
                     r"\([^)]*\): 2\b", out), out[-3000:]


@pytest.mark.parametrize("topology", ["ps", "allreduce"])
def test_exit_after_backward_under_overlap_is_clean(topology):
    """The script ends after a backward without step() while the bucket thread exchanges: exit code 0,
    no abort (three runs)."""
    for _ in range(3):
        proc = run_mpi(2, [MPI_DIR / "fault_rank_dies.py", "exit", topology], check=False, timeout=90)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "terminate called" not in out and "signal" not in out, out[-3000:]


def test_exit_after_a_backward_on_one_rank_only_ends_the_job():
    """Rank 0 alone runs a backward (its buckets go out, unpaired), then the script ends: rank 0 says so and
    aborts the job once the grace after its main thread's end is over, instead of hanging at exit."""
    proc = run_mpi(2, [MPI_DIR / "fault_rank_dies.py", "exit_one", "ps"], check=False, timeout=90)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and JOB_TIMED_OUT not in out, out[-3000:]
    assert "hvd_distef: rank 0: the script has ended while the buckets of a backward pass without step()" in out, \
        out[-3000:]
