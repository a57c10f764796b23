"""The batch scripts in launch/slurm/, submitted for real to a one-node Slurm cluster that the
fixture starts (launch/slurm/local_cluster.sh) and always stops."""
import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import ROOT

SCRIPT = ROOT / "launch" / "slurm" / "local_cluster.sh"
PORTS = {"SLURMCTLD_PORT": "6917", "SLURMD_PORT": "6918"}  # apart from a cluster of `make slurm-up`


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root")
    if not all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        pytest.skip("Slurm is not installed (scripts/install.sh installs slurmd slurmctld slurm-client munge)")
    cluster = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, **PORTS)
    up = subprocess.run(["bash", str(SCRIPT), "up", str(cluster)], env=env, capture_output=True, text=True,
                        timeout=120)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield dict(env, SLURM_CONF=str(cluster / "slurm.conf"), HVD_DISTEF_HOME=str(ROOT), OMP_NUM_THREADS="1")
    finally:
        subprocess.run(["bash", str(SCRIPT), "down", str(cluster)], env=env, capture_output=True, timeout=60)


def submit(env, script, log_dir, tasks=2, timeout=240):
    """sbatch --wait: returns (exit code, job id, job output)."""
    out = log_dir.parent / f"{log_dir.name}.out"
    proc = subprocess.run(["sbatch", "--wait", "-n", str(tasks), "-o", str(out), "--export=ALL",
                           str(ROOT / "launch" / "slurm" / script), "--epochs", "1", "--subset", "256",
                           "--batch-size", "16", "--no-progress", "--log-dir", str(log_dir)],
                          cwd=log_dir.parent, env=env, capture_output=True, text=True, timeout=timeout)
    job = re.search(r"Submitted batch job (\d+)", proc.stdout)
    return proc.returncode, job and job.group(1), out.read_text() if out.exists() else proc.stderr


@pytest.mark.parametrize("script", ["mpirun.sbatch", "horovodrun.sbatch", "srun.sbatch"])
def test_batch_script_trains(slurm, tmp_path, script):
    rc, job, output = submit(slurm, script, tmp_path / "run")
    assert rc == 0, output[-3000:]
    info = subprocess.run(["scontrol", "show", "job", job], env=slurm, capture_output=True, text=True).stdout
    assert "JobState=COMPLETED" in info and "ExitCode=0:0" in info, info
    [epoch] = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epoch["ranks"] == 2 and epoch["steps"] == 256 // 32 and epoch["bytes_sent_per_step"] > 0


def test_failing_job_is_reported_failed(slurm, tmp_path):
    proc = subprocess.run(["sbatch", "--wait", "-n", "2", "-o", str(tmp_path / "bad.out"), "--export=ALL",
                           str(ROOT / "launch" / "slurm" / "mpirun.sbatch"), "--batch-size", "0"],
                          cwd=tmp_path, env=slurm, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "must be a positive integer" in (tmp_path / "bad.out").read_text()
