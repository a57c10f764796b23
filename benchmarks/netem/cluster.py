"""An emulated cluster on one machine: one network namespace per node, veth pairs into a bridge
that is connected to nothing else, each link limited with netem (rate and delay, both ends), and
mpirun started inside the first namespace. A node holds ``ranks_per_node`` ranks (consecutive ranks),
which talk over shared memory (Open MPI's vader) as on one host; nodes talk over TCP only, through the
shaped links. Each rank is bound to a core of its own where there are enough, as on a cluster where
each rank has cores of its own (``core_of``: node plus local rank, modulo the cores this process may
use, so that the nodes' local ranks 0 spread over the cores); each namespace is a host to Open MPI,
whose default binding would put every rank of a node on one core.

Needs root (it refuses with a clear message otherwise) and always cleans up: namespaces, bridge,
its hosts-file lines, also after an error or Ctrl-C.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

PREFIX = "hvdr"          # namespace names hvdr0, hvdr1, ...
BRIDGE = "hvdbr0"
SUBNET = "10.77.0"
HOSTS = Path("/etc/hosts")
MARK = "# hvd_distef netem"


class HarnessError(RuntimeError):
    pass


def _ip(*args: str, ns: Optional[str] = None) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise HarnessError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc


def rate_bits(rate: str) -> float:
    """'1gbit' -> 1e9."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1}
    for unit, scale in units.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * scale
    raise ValueError(f"rate must end in kbit, mbit or gbit, got {rate!r}")


def can_run() -> Optional[str]:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, tc)"
    for tool in ("ip", "tc"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            return f"{tool} is missing (apt-get install iproute2)"
    probe = subprocess.run(["ip", "netns", "add", f"{PREFIX}probe"], capture_output=True, text=True)
    if probe.returncode:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", f"{PREFIX}probe"], capture_output=True)
    return None


def _kill_processes_in(namespaces: List[str]) -> None:
    """SIGTERM, then SIGKILL after 5 s, every process living in these namespaces."""
    def pids():
        found = []
        for ns in namespaces:
            out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
            found += [int(p) for p in out.split()]
        return found
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = pids()
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        for _ in range(50):
            if not pids():
                return
            time.sleep(0.1)


class EmulatedCluster:
    """``with EmulatedCluster(4, rate="1gbit", delay="0.1ms", ranks_per_node=2) as c: c.mpirun([...])``."""

    def __init__(self, ranks: int, rate: str = "1gbit", delay: Optional[str] = None, ranks_per_node: int = 1):
        if ranks % ranks_per_node:
            raise ValueError(f"{ranks} ranks do not fill nodes of {ranks_per_node}")
        self.ranks, self.rate, self.delay, self.ranks_per_node = ranks, rate, delay, ranks_per_node
        self.names = [f"{PREFIX}{i}" for i in range(ranks // ranks_per_node)]
        self.tmp = Path(tempfile.mkdtemp(prefix="hvd_netem_"))
        self._old_handlers = {}

    def __enter__(self) -> "EmulatedCluster":
        why = can_run()
        if why:
            raise HarnessError(f"benchmarks/netem: {why}")
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def _on_signal(self, signum, frame):
        self.down()
        raise KeyboardInterrupt(f"signal {signum}")

    def core_of(self, rank: int) -> int:
        """Which of the usable cores (by index, modulo their number) ``rank`` is bound to: its node plus its
        local rank, so that the nodes' local ranks 0 (``hierarchical``'s leaders, the ``ps`` server's node)
        do not all share one core."""
        return rank // self.ranks_per_node + rank % self.ranks_per_node

    @property
    def burst_bytes(self) -> int:
        """The token bucket's burst: 10 ms of traffic (a burst leaves at the veth's speed: smaller messages
        than this are not held to ``rate``)."""
        return max(32_000, int(rate_bits(self.rate) / 8 / 100))

    def settings(self) -> dict:
        """How the cluster is made and launched, for the results file."""
        return {"ranks_per_node": self.ranks_per_node, "rate": self.rate, "delay": self.delay,
                "burst_bytes": self.burst_bytes, "binding": "rank -> core (node + local rank) mod cores",
                "btl": "tcp,vader,self" if self.ranks_per_node > 1 else "tcp,self",
                "vader_single_copy": "none", "mpi_yield_when_idle": 1}

    def _shape(self, dev: str, ns: Optional[str] = None) -> None:
        """A token bucket at ``rate`` (``burst_bytes``), and netem's delay under it if asked."""
        _ip("tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "tbf", "rate", self.rate,
            "burst", str(self.burst_bytes), "latency", "100ms", ns=ns)
        if self.delay:
            _ip("tc", "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "netem", "delay", self.delay,
                ns=ns)

    def _up(self) -> None:
        self.down(quiet=True)  # leftovers of a killed run
        _ip("ip", "link", "add", BRIDGE, "type", "bridge")
        _ip("ip", "link", "set", BRIDGE, "up")
        lines = []
        for i, ns in enumerate(self.names):
            host_end, addr = f"{PREFIX}v{i}", f"{SUBNET}.{i + 1}"
            _ip("ip", "netns", "add", ns)
            _ip("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("ip", "link", "set", host_end, "master", BRIDGE)
            _ip("ip", "link", "set", host_end, "up")
            _ip("ip", "addr", "add", f"{addr}/24", "dev", "eth0", ns=ns)
            _ip("ip", "link", "set", "eth0", "up", ns=ns)
            _ip("ip", "link", "set", "lo", "up", ns=ns)
            self._shape(host_end)
            self._shape("eth0", ns=ns)
            lines.append(f"{addr} {ns} {MARK}")
        with HOSTS.open("a") as f:
            f.write("\n".join(lines) + "\n")
        (self.tmp / "hostfile").write_text("".join(f"{ns} slots={self.ranks_per_node}\n" for ns in self.names))
        cores = sorted(os.sched_getaffinity(0))
        (self.tmp / "rankfile").write_text("".join(
            f"rank {i}={self.names[i // self.ranks_per_node]} slot={cores[self.core_of(i) % len(cores)]}\n"
            for i in range(self.ranks)))
        agent = self.tmp / "agent.sh"
        # each namespace a host of its own name (a UTS namespace too): processes that share a host name
        # are taken for one host by MPI's and Horovod's locality checks, and two ranks per namespace then
        # crashed Horovod's init over TCP
        agent.write_text('#!/bin/sh\nhost="$1"; shift\n'
                         'exec ip netns exec "$host" unshare --uts sh -c "hostname $host; $*"\n')
        agent.chmod(0o755)
        self._wait_until_ranks_answer()

    def _wait_until_ranks_answer(self, tries: int = 5) -> None:
        """A trivial job on every namespace; fresh links have once refused the first launch."""
        for attempt in range(tries):
            proc = self.mpirun(["true"], timeout=60, yield_when_idle=False)
            if proc.returncode == 0:
                return
            time.sleep(1 + attempt)
        raise HarnessError(f"mpirun cannot reach the namespaces:\n{proc.stderr[-2000:]}")

    def down(self, quiet: bool = False) -> None:
        """Remove every namespace, the bridge and the hosts-file lines this harness adds."""
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
        ours = [line.split(" ")[0] for line in listed if line.startswith(PREFIX)]
        _kill_processes_in(ours)  # ranks of an interrupted job (their daemons detach from mpirun)
        for name in ours:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout.split("\n")
        for line in links:  # host ends whose namespace outlived a deletion (a process kept it)
            name = line.split(" ")[0].split("@")[0]
            if name.startswith(f"{PREFIX}v"):
                subprocess.run(["ip", "link", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
        if HOSTS.exists() and MARK in HOSTS.read_text():
            HOSTS.write_text("".join(l for l in HOSTS.read_text().splitlines(True) if MARK not in l))
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}

    def mpirun(self, argv: List[str], timeout: float = 1800, env: Optional[dict] = None,
               yield_when_idle: bool = True) -> subprocess.CompletedProcess:
        """Run ``argv`` on every rank, one per namespace, over TCP through the shaped links, rank i
        bound to core i mod (the cores this process may use).

        ``yield_when_idle``: a rank waiting in MPI yields its core instead of spinning. Each
        namespace is a one-slot "host", so Open MPI would spin; with more ranks than cores, a
        spinning rank would take the core another rank computes on, which on a cluster (cores per
        rank) it cannot. Applies to every topology alike, Horovod's allreduce included.
        """
        # mpirun runs in the first node's namespace and starts that node's ranks itself: under its host name too
        cmd = ["ip", "netns", "exec", self.names[0], "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
               self.names[0], "mpirun", "-np", str(self.ranks), "--hostfile",
               str(self.tmp / "hostfile"), "--rankfile", str(self.tmp / "rankfile"),
               "--mca", "plm_rsh_agent", str(self.tmp / "agent.sh"),
               "--mca", "btl", "tcp,vader,self" if self.ranks_per_node > 1 else "tcp,self",
               "--mca", "btl_vader_single_copy_mechanism", "none",
               "--mca", "btl_tcp_if_include", "eth0",
               "--mca", "oob_tcp_if_include", "eth0", "--mca", "mpi_yield_when_idle", str(int(yield_when_idle)),
               # the orteds of all namespaces share this machine; their hwloc shared-memory topology
               # write races and once segfaulted a launch: skip it
               "--mca", "rtc_hwloc_vmhole", "none",
               "--timeout", str(int(timeout)), "-x", "OMP_NUM_THREADS=1", "-x", "PYTHONPATH", *argv]
        env = dict(os.environ if env is None else env, OMPI_ALLOW_RUN_AS_ROOT="1",
                   OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 60, env=env)


if __name__ == "__main__":
    with EmulatedCluster(2, rate="100mbit") as c:
        print(c.mpirun([sys.executable, "-c", "from mpi4py import MPI; print(MPI.COMM_WORLD.rank)"]).stdout)
