"""The emulated-cluster harness of benchmarks/netem: two namespaces on a slow link, a few steps,
and a full teardown (skipped with the reason where namespaces cannot be made)."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks" / "netem"))
import cluster  # noqa: E402

WHY = cluster.can_run()


@pytest.mark.skipif(WHY is not None, reason=f"no network namespaces here: {WHY}")
def test_two_ranks_on_a_slow_link(tmp_path):
    out = tmp_path / "records.jsonl"
    with cluster.EmulatedCluster(2, rate="50mbit") as c:
        start = time.monotonic()
        proc = c.mpirun([sys.executable, str(ROOT / "benchmarks" / "netem" / "bench_step.py"), "--params", "2e5",
                         "--topologies", "allreduce", "ps", "--steps", "2", "--rate", "50mbit", "--out", str(out)],
                        timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "hvdr0" in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        # rank i on core i mod the cores here, as a cluster gives each rank its own (Open MPI's default
        # binding, one "host" per namespace, would put both on core 0)
        bound = c.mpirun([sys.executable, "-c", "import os; print(os.environ['OMPI_COMM_WORLD_RANK'], "
                          "*sorted(os.sched_getaffinity(0)))"], timeout=60)
        assert bound.returncode == 0, bound.stderr[-3000:]
        cores = sorted(os.sched_getaffinity(0))
        assert sorted(bound.stdout.split("\n")[:-1]) == [f"{i} {cores[i % len(cores)]}" for i in range(2)]
    records = {r["topology"]: r for r in map(json.loads, out.read_text().splitlines())}
    d = records["ps"]["params"]
    assert records["allreduce"]["bytes_sent_per_step"] == pytest.approx(4 * d)  # 2·(M−1)/M·4d at M = 2
    # 800 kB each way at 50 Mbit/s takes at least 0.12 s: the link really is shaped
    assert records["allreduce"]["step_time_median_s"] > 0.12
    assert records["ps"]["step_time_median_s"] < records["allreduce"]["step_time_median_s"]
    assert time.monotonic() - start < 200
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert cluster.PREFIX not in leftovers and cluster.MARK not in open("/etc/hosts").read()
    assert subprocess.run(["ip", "link", "show", cluster.BRIDGE], capture_output=True).returncode != 0


def test_refuses_without_rights(monkeypatch):
    monkeypatch.setattr(cluster.os, "geteuid", lambda: 1000)
    with pytest.raises(cluster.HarnessError, match="needs root"):
        with cluster.EmulatedCluster(2):
            pass


@pytest.mark.skipif(WHY is not None, reason=f"no network namespaces here: {WHY}")
def test_teardown_after_an_error_kills_what_runs_inside():
    sleeper = None
    with pytest.raises(RuntimeError, match="boom"):
        with cluster.EmulatedCluster(2, rate="50mbit"):
            sleeper = subprocess.Popen(["ip", "netns", "exec", "hvdr1", "sleep", "300"])
            time.sleep(0.5)
            raise RuntimeError("boom")
    assert sleeper.wait(timeout=10) != 0  # killed, not finished
    assert cluster.PREFIX not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{cluster.PREFIX}v" not in subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
