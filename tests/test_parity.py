"""Drop-in parity with torch.optim.SGD and horovod.torch (SPEC §5a) under mpirun with 2 and 3 ranks
(see tests/mpi/check_parity.py)."""
import pytest

from conftest import assert_case, cases_fixture
from hvd_distef import _kernels

CASES = ["frozen_and_gradless_parameters_untouched_every_way", "frozen_parameters_under_allreduce_equal_stock_horovod",
         "step_with_no_gradients_changes_nothing", "param_groups_are_shared", "hyperparameters_change_at_run_time",
         "zero_lr_keeps_errors_and_rescales_by_last_nonzero", "broadcast_optimizer_state_takes_no_step",
         "grad_scaler_skips_on_every_rank", "horovod_amp_recipe_skips_alike", "stock_checkpoint_resumes_under_allreduce",
         "fp16_on_the_wire_stays_finite", "ranks_that_disagree_raise_on_every_rank",
         "rejected_checkpoint_changes_nothing", "an_error_leaves_the_next_step_intact",
         "comm_subset_restricts_allreduce", "gradient_clipping_recipe",
         "update_decompressing_payloads_equals_decompressed_update", "worker_step_ahead_equals_the_two_passes",
         "synchronize_then_step_warns_once",
         "horovod_arguments_accepted_or_refused", "predivide_and_sum_under_allreduce_equal_stock_horovod",
         "sparse_gradients_are_densified", "step_hooks_run_once_per_step",
         "many_optimizers_share_one_communicator", "user_compressor_with_arbitrary_attributes"]


#: compiled kernels against the torch path: with the torch path forced, there is nothing to compare
#: (where the extension did not build, these fail, as tests/test_build.py does)
COMPILED_VS_TORCH = {"update_decompressing_payloads_equals_decompressed_update",
                     "worker_step_ahead_equals_the_two_passes"}

results = cases_fixture("check_parity.py")


@pytest.mark.parametrize("case", CASES)
def test_parity(results, case):
    if case in COMPILED_VS_TORCH and _kernels._forced_torch():
        pytest.skip(f"{_kernels.FORCE_TORCH_ENV} is set: no compiled kernels to compare the torch path with")
    assert_case(results, case)
