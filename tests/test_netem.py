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


def _qdiscs(dev, ns=None):
    cmd = ["tc", "qdisc", "show", "dev", dev]
    return subprocess.run(["ip", "netns", "exec", ns, *cmd] if ns else cmd, capture_output=True, text=True).stdout


@pytest.mark.skipif(WHY is not None, reason=f"no network namespaces here: {WHY}")
def test_two_ranks_on_a_slow_link(tmp_path):
    """Both ends of every link shaped to the rate asked for, a few steps of two topologies run across
    them (ranks bound to distinct cores), and nothing left behind. How fast the steps are is
    benchmarks/netem's to measure, not a test's."""
    out = tmp_path / "records.jsonl"
    with cluster.EmulatedCluster(2, rate="50mbit") as c:
        for i, ns in enumerate(c.names):
            for shaped in (_qdiscs("eth0", ns), _qdiscs(f"{cluster.PREFIX}v{i}")):
                assert "qdisc tbf 1: root" in shaped and "rate 50Mbit" in shaped, shaped
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
    assert sorted(records) == ["allreduce", "ps"]
    assert all(len(r["step_times_s"]) == 2 for r in records.values())
    # ps + blocksign, bytes we hand to MPI: rank 0 sends Δ̃ to and receives Δ from its one peer, each
    # ceil(d/8) sign bytes and a float32 scale per tensor (SPEC §3)
    ps = records["ps"]
    s = -(-ps["params"] // 8) + 4 * ps["tensors"]
    assert ps["bytes_sent_per_step"] == ps["bytes_received_per_step"] == ps["max_bytes_sent_per_step"] == s
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert cluster.PREFIX not in leftovers and cluster.MARK not in open("/etc/hosts").read()
    assert subprocess.run(["ip", "link", "show", cluster.BRIDGE], capture_output=True).returncode != 0


@pytest.mark.skipif(WHY is not None, reason=f"no network namespaces here: {WHY}")
def test_nodes_of_two_ranks(tmp_path):
    """2 nodes x 2 ranks: each node a host of its own name (Horovod's local ranks follow), and
    `hierarchical` with local_size=2 sends across each node's link one compressed payload per node: its
    node's link carries less than flat `sharded`'s, which sends from every rank."""
    out = tmp_path / "records.jsonl"
    with cluster.EmulatedCluster(4, rate="200mbit", ranks_per_node=2) as c:
        # each rank's line in one write: mpirun forwards the ranks' output as it comes, pieces interleaved
        where = c.mpirun([sys.executable, "-c", "import os, socket, horovod.torch as hvd; hvd.init(); os.write(1, "
                          "f'{hvd.rank()} {socket.gethostname()} {hvd.local_rank()} {hvd.local_size()}\\n'.encode())"],
                         timeout=120)
        assert where.returncode == 0, where.stderr[-3000:]
        assert sorted(where.stdout.split("\n")[:-1]) == [f"{r} {c.names[r // 2]} {r % 2} 2" for r in range(4)]
        proc = c.mpirun([sys.executable, str(ROOT / "benchmarks" / "netem" / "bench_step.py"), "--params", "2e5",
                         "--topologies", "sharded", "hierarchical", "--steps", "2", "--rate", "200mbit", "--out",
                         str(out), "--ranks-per-node", "2"], timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["topology"]: r for r in map(json.loads, out.read_text().splitlines())}
    links = {t: max(sent + received for sent, received in r["node_link_bytes_per_step"]) for t, r in records.items()}
    assert all(len(r["node_link_bytes_per_step"]) == 2 for r in records.values()), records
    assert 0 < links["hierarchical"] < links["sharded"], links


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
