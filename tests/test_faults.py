"""Faults with a clear outcome on every rank and nothing lost: bad input, disagreeing ranks, a dead
or hung rank, a Gloo launch, bad checkpoints, invalid options."""
import re
import subprocess
import sys

import pytest
import torch

from conftest import MPI_DIR, ROOT, assert_case, cases_fixture, mpi_env, run_mpi

CASES = ["nan_gradient_raises_on_every_rank_and_changes_nothing", "nan_gradient_skip_counts_and_continues",
         "ranks_with_different_models", "ranks_with_different_options", "gradient_none_on_one_rank_counts_as_zero",
         "checkpoint_from_another_configuration", "local_failure_on_one_rank_reaches_every_rank"]


results = cases_fixture("check_faults.py", ranks=(3,))


@pytest.mark.parametrize("case", CASES)
def test_fault(results, case):
    assert_case(results, case)


#: what mpirun prints when its --timeout (run_mpi's hang guard) ends a job
JOB_TIMED_OUT = "time limit for job execution has been reached"


@pytest.mark.parametrize("mode,ended_by", [
    ("kill", r"process rank 1 with PID \d+ on node \S+ exited on signal 9"),  # Open MPI names the dead rank
    ("hang", r"hvd_distef: rank [02]: no progress for 5 s in MPI [\w ()]+"),  # a waiting rank, and where it waits
])
def test_dead_or_hung_rank_ends_the_job(mode, ended_by):
    """Rank 1 of 3 dies (SIGKILL) or hangs at step 3 (timeout_s=5): the job ends on every rank before
    training finishes, with a message naming the dead rank, or a live rank and the collective it
    waited in (our watchdog), not by the hang guard (mpirun's --timeout, 12 times the bound)."""
    proc = run_mpi(3, [MPI_DIR / "fault_rank_dies.py", mode], check=False, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "unreachable" not in out
    assert JOB_TIMED_OUT not in out, f"the job hung until mpirun's --timeout ended it:\n{out[-3000:]}"
    assert re.search(ended_by, out), out[-3000:]


def test_gloo_launch_gives_a_clear_error():
    horovodrun = ROOT / ".venv" / "bin" / "horovodrun"
    if not horovodrun.exists():
        pytest.skip("horovodrun is not installed in .venv (run `make install`)")
    proc = subprocess.run([str(horovodrun), "--gloo", "-np", "2", sys.executable, str(MPI_DIR / "gloo_launch.py")],
                          cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "unreachable" not in out
    assert "launched by Horovod with Gloo" in out and "horovodrun --mpi" in out, out[-3000:]


def _train(tmp_path, ranks, *extra):
    return run_mpi(ranks, ["-m", "hvd_distef.train", "--subset", "256", "--batch-size", "16", "--no-progress",
                           "--log-dir", tmp_path, "--checkpoint-every", "1", *extra], check=False, timeout=120)


def test_corrupt_checkpoint_is_a_clear_error_on_every_rank(tmp_path):
    assert _train(tmp_path, 2, "--epochs", "1").returncode == 0
    ckpt = tmp_path / "checkpoint" / "job.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # truncated
    proc = _train(tmp_path, 2, "--epochs", "2", "--resume")
    assert proc.returncode != 0
    assert proc.stderr.count("cannot resume") == 2, proc.stderr[-2000:]
    assert "rank 0: cannot read it" in proc.stderr and "rank 1: cannot read it" in proc.stderr, proc.stderr[-2000:]


def test_checkpoint_from_another_world_size(tmp_path):
    assert _train(tmp_path, 2, "--epochs", "1").returncode == 0
    proc = _train(tmp_path, 3, "--epochs", "2", "--resume")
    assert proc.returncode != 0 and "written by 2 ranks, this run has 3" in proc.stderr, proc.stderr[-2000:]


def test_checkpoint_write_is_atomic(tmp_path):
    """No temporary file is left behind and the checkpoint loads (written to .tmp, then renamed)."""
    assert _train(tmp_path, 2, "--epochs", "1").returncode == 0
    files = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert files == ["job.pt"]
    assert torch.load(tmp_path / "checkpoint" / "job.pt", weights_only=False)["epoch"] == 1


@pytest.mark.parametrize("kwargs,message", [
    ({"lr": -0.1}, "lr must be >= 0"),
    ({"momentum": 1.5}, "momentum must be in"),
    ({"compression": "nope"}, "unknown compression 'nope'"),
    ({"topology": "nope"}, "unknown topology 'nope'"),
    ({"compression": "k"}, "k=100000 is larger"),
    ({"compression": "bs0"}, "block_size must be a positive integer"),
    ({"backward_passes_per_step": 0}, "backward_passes_per_step"),
    ({"nonfinite": "ignore"}, "nonfinite must be one of"),
    ({"timeout_s": 0}, "timeout_s must be positive"),
])
def test_invalid_options_raise_value_error_naming_the_option(kwargs, message):
    code = f"""
import torch, hvd_distef
kw = {kwargs!r}
lr, momentum = kw.pop("lr", 0.1), kw.pop("momentum", 0.0)
special = {{"k": hvd_distef.Compression.topk(k=100000), "bs0": None}}
if kw.get("compression") == "bs0":
    hvd_distef.Compression.blocksign(block_size=0)
if kw.get("compression") in special:
    kw["compression"] = special[kw["compression"]]
model = torch.nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=abs(lr), momentum=0.0)
opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"] = lr, momentum
hvd_distef.DistributedOptimizer(opt, named_parameters=model.named_parameters(), **kw)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=mpi_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError") and message in last, proc.stderr[-2000:]




@pytest.mark.parametrize("given,seen", [(None, "1"), ("0", "0")])
def test_a_rank_waiting_in_mpi_yields_unless_told_otherwise(given, seen):
    """``import hvd_distef`` in a process a launcher started (here horovodrun's variables, one rank)
    starts MPI with Open MPI's mpi_yield_when_idle at 1, unless the launcher or the user set it (here
    0, which stays)."""
    env = {k: v for k, v in mpi_env().items() if k != "OMPI_MCA_mpi_yield_when_idle"}
    env.update(HOROVOD_RANK="0", HOROVOD_SIZE="1")
    if given is not None:
        env["OMPI_MCA_mpi_yield_when_idle"] = given
    code = ("import os, hvd_distef; from mpi4py import MPI; "
            "print(MPI.Is_initialized(), os.environ['OMPI_MCA_mpi_yield_when_idle'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["True", seen], proc.stdout + proc.stderr[-2000:]


def test_a_plain_process_starts_no_mpi():
    """Importing hvd_distef, the report, the training CLI's parser or the experiments' report in a
    process no launcher started does not initialize MPI (``python -m hvd_distef.train --help`` neither)."""
    env = {k: v for k, v in mpi_env().items() if not k.startswith(("OMPI_COMM_WORLD", "PMI", "HOROVOD_"))}
    code = ("import sys, hvd_distef, hvd_distef.report, hvd_distef.experiments.report; "
            "from hvd_distef.train import cli; cli.parser(); "
            "print('mpi4py.MPI' in sys.modules and sys.modules['mpi4py.MPI'].Is_initialized())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["False"], proc.stdout + proc.stderr[-2000:]
    code = ("import runpy, sys\nsys.argv = ['train', '--help']\ntry:\n"
            "    runpy.run_module('hvd_distef.train', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('MPI initialized:', 'mpi4py.MPI' in sys.modules and sys.modules['mpi4py.MPI'].Is_initialized())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert "--method" in proc.stdout and "MPI initialized: False" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_ranks_talk_mpi_after_another_has_ended(tmp_path):
    """MPI is mpi4py's, finalized at exit on the main thread, not Horovod's: Horovod would finalize it
    on its thread as soon as rank 0 ends, under ranks 1 and 2 (a slow link's last broadcast hung so).
    After rank 0 has ended, each of them receives rank 0's last message and exchanges one with the
    other, over COMM_WORLD."""
    proc = run_mpi(3, [MPI_DIR / "exit_order.py", "after-peer-ends", tmp_path / "ended"], timeout=120)
    for rank, peer in ((1, 2), (2, 1)):
        heard = f"rank {rank} used MPI after rank 0 ended: 'last message of rank 0 to rank {rank}', " \
                f"'rank {peer} to rank {rank}'"
        assert heard in proc.stdout, proc.stdout + proc.stderr[-3000:]


def test_horovod_initialized_first_is_refused_on_every_rank(tmp_path):
    proc = run_mpi(2, [MPI_DIR / "exit_order.py", "horovod-first", tmp_path / "ended"], timeout=120)
    for rank in (0, 1):
        assert f"rank {rank}: hvd.init() ran before hvd_distef was imported" in proc.stdout, proc.stdout
