"""hvd_distef's MPI handle: a duplicate of Horovod's world communicator, with byte counters.

We talk MPI through mpi4py on the same world as Horovod. Duplicating the communicator gives our
collectives their own context, so they never match or interleave with the collectives Horovod's
background thread runs at the same time.

Buffers may live on the CPU or on a CUDA device; ``Staging`` is the one place that decides how CUDA
bytes reach MPI (directly, or through pinned host buffers reused across steps).
"""
from __future__ import annotations

import copy
import ctypes
import os
import pickle
import sys
import threading
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .errors import HvdDistefError, raised_on_every_rank

GLOO_HINT = ("hvd_distef talks MPI through mpi4py; launch with MPI (horovodrun --mpi, mpirun or "
             "srun --mpi=pmix) and install mpi4py against the same MPI as Horovod")
#: seconds a collective may wait before the job is aborted (a launcher sets it; timeout_s= wins); torch's
#: default collective timeout is 10 to 30 minutes: a rank-0-only evaluation or checkpoint may take long
TIMEOUT_ENV = "HVD_DISTEF_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0
#: seconds a collective waits before rank 0 warns, naming the ranks not in it (Horovod's stall check: 60 s)
STALL_WARNING_ENV = "HVD_DISTEF_STALL_WARNING_S"
DEFAULT_STALL_WARNING_S = 60.0
#: seconds of waiting (at most a quarter of the warning's) after which a rank tells rank 0 which
#: collective it waits in, for the warning
REPORT_AFTER_S = 1.0
#: seconds a collective of a thread of ours may still wait after the script's main thread has ended
ORPHAN_GRACE_S = 10.0
STALL_TAG = 17
#: 1 or 0: whether MPI may be handed CUDA buffers; unset: ask the MPI library (MPIX_Query_cuda_support)
CUDA_AWARE_ENV = "HVD_DISTEF_CUDA_AWARE"


def check_not_gloo(mpi_size: int) -> None:
    """Under ``horovodrun --gloo`` every process sees an MPI world of one (a singleton): refuse,
    instead of training M unconnected copies."""
    hvd_size = os.environ.get("HOROVOD_SIZE")
    if os.environ.get("HOROVOD_CONTROLLER") == "gloo" or (hvd_size is not None and int(hvd_size) != mpi_size):
        raise HvdDistefError(f"this job was launched by Horovod with Gloo (HOROVOD_SIZE={hvd_size}, but the MPI "
                             f"world has {mpi_size} rank(s)); {GLOO_HINT}")


def _seconds(name: str, given: Optional[float], env: str, default: float) -> float:
    """A positive number of seconds: ``given``, else the environment variable ``env``, else ``default``."""
    value = float(os.environ.get(env, default)) if given is None else given
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return float(value)


def check_mpi(MPI, mpi_comm, process_set) -> None:
    """What our threads and collectives assume of MPI: ``MPI_THREAD_MULTIPLE`` (Horovod's background thread
    and overlap's bucket thread call MPI beside the thread that steps), and, where Horovod was started on a
    communicator of its own (``hvd.init(comm=...)``), that we are told which (``comm=``)."""
    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        raise HvdDistefError("MPI was started without MPI_THREAD_MULTIPLE (mpi4py.rc.thread_level set lower, or an "
                             "MPI built without thread support): Horovod's background thread calls MPI beside ours; "
                             "leave mpi4py's default thread level, or use an MPI built with threads")
    horovod = sys.modules.get("horovod.torch")
    if (mpi_comm is None and process_set is None and horovod is not None and horovod.is_initialized()
            and horovod.size() != MPI.COMM_WORLD.Get_size()):
        raise ValueError(f"Horovod runs on {horovod.size()} of the {MPI.COMM_WORLD.Get_size()} ranks of "
                         f"MPI.COMM_WORLD (hvd.init(comm=...)): pass the same communicator as comm=")


class Pending:
    """A result still on the wire: ``test()`` drives MPI's progress (a nonblocking collective moves
    only while some MPI call runs) and says whether it has arrived; ``wait()`` returns it."""

    def __init__(self, wait: Callable[[], Any], test: Callable[[], bool]):
        self.wait, self.test = wait, test


HOROVOD_FIRST = ("hvd.init() ran before hvd_distef was imported, so Horovod initialized MPI, and Horovod "
                 "finalizes an MPI it initialized on its background thread as soon as any rank's Horovod shuts "
                 "down (when the first rank ends), while the other ranks may still be in hvd_distef's "
                 "collectives: they would hang or crash. Import hvd_distef (or mpi4py's MPI) before hvd.init()")
#: Open MPI's setting for a rank waiting in MPI: yield its core between polls instead of spinning (what
#: Open MPI does by itself when a node is oversubscribed). Horovod's background thread waits in MPI every
#: cycle beside the thread that computes; where a rank has one core, its spinning takes compute from
#: stock Horovod and from us alike. Given before MPI starts, unless the launcher or the user gave it.
YIELD_WHEN_IDLE = ("OMPI_MCA_mpi_yield_when_idle", "1")
#: what an MPI launcher puts in every rank's environment: Open MPI's mpirun, MPICH and Intel MPI (PMI),
#: Slurm's srun (PMIx), horovodrun
LAUNCHED_BY = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "HOROVOD_RANK")


class MPIProcess:
    """This process's MPI, one object per process (``PROCESS``): who started it, and the communicators
    our collectives run on.

    MPI is started through mpi4py (``start``: ``MPI_THREAD_MULTIPLE``, and Open MPI's ``YIELD_WHEN_IDLE``
    unless set) before ``hvd.init()`` can start it: ``import hvd_distef`` does it in a process that an MPI
    launcher started (``LAUNCHED_BY``), and ``Comm`` in any other (a plain process imports the report or
    the CLI's parser without starting MPI). mpi4py then finalizes MPI at interpreter exit, on the main
    thread, after Horovod's own shutdown (an ``atexit`` handler) has stopped Horovod's thread, and
    MPI_Finalize lets every rank's last messages arrive. Where Horovod started MPI instead
    (``horovod_first``), it finalizes it on its background thread when any rank ends, under the other
    ranks' collectives: ``Comm`` refuses that order wherever there are other ranks (``HOROVOD_FIRST``).

    Communicators: one duplicate per base communicator (Horovod's world, a user's ``comm=``, a process
    set's ranks), shared by every optimizer built on it with ``overlap=False``, so a sweep that builds many
    optimizers holds one communicator, not one each: their collectives all run in the thread that calls
    step(), one at a time. An optimizer with ``overlap=True`` exchanges on its bucket thread while the
    script goes on (another optimizer's step, in a GAN): it gets a duplicate of its own (``Comm.private``),
    so that no two optimizers' collectives can ever interleave on one communicator.
    """

    def __init__(self):
        self.horovod_first = False
        self._duplicates: Dict[tuple, tuple] = {}  # (handle, world ranks) of a base -> (duplicate, StallReports)
        self._process_sets: Dict[tuple, Any] = {}  # ranks of a Horovod process set -> their communicator
        self._created = self._serials = 0
        self.abort_enabled, self.aborts = True, False  # ``abort_on_exception``

    def abort_on_exception(self) -> None:
        """From the first ``Comm`` of a job of several ranks on: an exception that no code catches ends the
        whole job (``MPI_Abort``) once Python has printed its traceback, as under ``python -m mpi4py``, instead
        of leaving the other ranks waiting in the next exchange. ``set_abort_on_exception(False)`` turns it
        off (a script that handles a rank's end itself)."""
        if self.aborts or not self.abort_enabled:
            return
        previous = sys.excepthook

        def hook(kind, value, traceback):
            previous(kind, value, traceback)
            if not self.abort_enabled or raised_on_every_rank(value):  # every rank ends by itself
                return
            from mpi4py import MPI
            sys.stderr.write(f"hvd_distef: rank {MPI.COMM_WORLD.Get_rank()}: uncaught {kind.__name__}; aborting "
                             f"the job so that no rank waits for this one (hvd_distef.set_abort_on_exception(False) "
                             f"to turn this off)\n")
            sys.stderr.flush()
            MPI.COMM_WORLD.Abort(1)

        sys.excepthook, self.aborts = hook, True

    @staticmethod
    def launched(environ=os.environ) -> bool:
        """Whether an MPI launcher started this process."""
        return any(name in environ for name in LAUNCHED_BY)

    def start(self) -> None:
        """Start MPI through mpi4py unless it runs already, noting whether Horovod started it first."""
        if "mpi4py.MPI" in sys.modules:
            return
        horovod = sys.modules.get("horovod.torch")
        self.horovod_first = horovod is not None and bool(horovod.is_initialized())
        if not self.horovod_first:
            os.environ.setdefault(*YIELD_WHEN_IDLE)
        try:
            from mpi4py import MPI  # noqa: F401  (importing it initializes MPI)
        except ImportError:
            pass  # Comm says why, when an optimizer is built

    def communicator(self, mpi_comm: Optional[Any], process_set: Optional[Any]):
        """The base communicator of an optimizer: ``comm=``, else the ranks of Horovod's ``process_set=``
        (COMM_SELF on a rank outside it: it trains locally, as horovod.torch does), else MPI.COMM_WORLD."""
        from mpi4py import MPI
        if mpi_comm is not None and process_set is not None:
            raise ValueError("give comm= or process_set=, not both")
        if process_set is None:
            return MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        if getattr(process_set, "mpi_comm", None) is not None:
            return process_set.mpi_comm
        ranks = getattr(process_set, "ranks", None)
        if ranks is None:
            raise ValueError(f"process_set {process_set} is not registered with Horovod: pass it to "
                             f"hvd.init(process_sets=...) or hvd.add_process_set() first")
        ranks = sorted(int(r) for r in ranks)
        world = MPI.COMM_WORLD
        if ranks == list(range(world.Get_size())):
            return world
        if world.Get_rank() not in ranks:
            return MPI.COMM_SELF
        if tuple(ranks) not in self._process_sets:
            self._process_sets[tuple(ranks)] = world.Create_group(world.Get_group().Incl(ranks))
        return self._process_sets[tuple(ranks)]

    def duplicate(self, base, complete: Callable[..., None]):
        """The duplicate of ``base`` our collectives run on and the ``StallReports`` of its ranks (two
        MPI_Comm_idup once per base, completed by ``complete(what, request)``)."""
        from mpi4py import MPI
        # keyed by the handle and the world ranks it holds: a freed user communicator's handle may be
        # reused for another group, which then gets a duplicate of its own
        group, world = base.Get_group(), MPI.COMM_WORLD.Get_group()
        key = (base.py2f(), tuple(MPI.Group.Translate_ranks(group, list(range(group.Get_size())), world)))
        group.Free()
        world.Free()
        if key not in self._duplicates:
            self._duplicates[key] = (self.idup(base, complete), StallReports(self.idup(base, complete, counted=False)))
        return self._duplicates[key]

    def idup(self, base, complete: Callable[..., None], counted: bool = True):
        """A new duplicate of ``base`` (collective over its ranks), counted in ``duplicates`` unless it only
        carries stall reports."""
        dup, request = base.Idup()
        complete("MPI_Comm_idup", request)
        self._created += counted
        return dup

    def next_serial(self) -> int:
        """1, 2, ...: the ``Comm`` objects of this process, numbered in the order they were built."""
        self._serials += 1
        return self._serials

    @property
    def duplicates(self) -> int:
        """How many communicators this process has duplicated for collectives."""
        return self._created


#: this process's MPI (``MPIProcess``)
PROCESS = MPIProcess()


def set_abort_on_exception(enabled: bool) -> None:
    """Whether an uncaught exception on one rank aborts the whole job (the default once an optimizer is
    built in a job of several ranks; ``MPIProcess.abort_on_exception``)."""
    PROCESS.abort_enabled = bool(enabled)


def initialize_mpi() -> None:
    """At ``import hvd_distef``: start MPI where an MPI launcher started this process (``MPIProcess``)."""
    if PROCESS.launched():
        PROCESS.start()


def cuda_aware_mpi(MPI) -> bool:
    """Whether the MPI library takes CUDA buffers: ``HVD_DISTEF_CUDA_AWARE`` (1 or 0) when set, else
    mpi4py's ``Query_cuda_support`` where it has one, else Open MPI's ``MPIX_Query_cuda_support``
    looked up in the process, else False (other MPIs: set the variable)."""
    forced = os.environ.get(CUDA_AWARE_ENV, "")
    if forced:
        return forced != "0"
    query = getattr(MPI, "Query_cuda_support", None)
    if query is not None:
        return bool(query())
    try:
        query = ctypes.CDLL(None).MPIX_Query_cuda_support
    except (OSError, AttributeError):
        return False
    query.restype = ctypes.c_int
    return bool(query())


class Staging:
    """How a tensor's bytes reach MPI. CPU tensors go as they are. CUDA tensors go directly when MPI
    is CUDA-aware (after the tensor's stream is synchronized: MPI does not know torch's streams),
    else through pinned host buffers, one to send and one to receive, kept and reused across steps
    (a step's payloads are about 1/32 of the gradient; pinned memory copies at full bus speed). Every
    copy is synchronous, so a buffer is free again when a collective returns.

    ``send(t)`` gives what to hand MPI to send tensor t; ``inplace(t)`` what to hand MPI to receive
    into t (holding t's values first with ``fill``, for an in-place reduction) and a function that
    completes t and returns it; ``recv(n, dtype, device)`` the same for a new tensor of n elements.
    """

    def __init__(self, cuda_aware: bool):
        self.cuda_aware = cuda_aware
        self._pinned: Dict[str, torch.Tensor] = {}

    def _host(self, role: str, t: torch.Tensor) -> torch.Tensor:
        nbytes = t.numel() * t.element_size()
        buf = self._pinned.get(role)
        if buf is None or buf.numel() < nbytes:
            buf = self._pinned[role] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return buf[:nbytes].view(t.dtype)

    def send(self, t: torch.Tensor):
        if t.device.type == "cpu":
            return t.numpy()
        if self.cuda_aware:
            torch.cuda.current_stream(t.device).synchronize()
            return t
        return self._host("send", t).copy_(t).numpy()

    def inplace(self, t: torch.Tensor, fill: bool = False) -> Tuple[Any, Callable[[], torch.Tensor]]:
        if t.device.type == "cpu":
            return t.numpy(), lambda: t
        if self.cuda_aware:
            torch.cuda.current_stream(t.device).synchronize()
            return t, lambda: t
        host, finish = self.on_host(t, fill)
        return host.numpy(), finish

    def on_host(self, t: torch.Tensor, fill: bool = True) -> Tuple[torch.Tensor, Callable[[], torch.Tensor]]:
        """A CPU tensor standing for t (t itself on the CPU, else the pinned receive buffer, holding t's
        values with ``fill``) and a function that copies it back into t and returns t: for
        libraries that take CPU tensors only (Horovod built without GPU operations)."""
        if t.device.type == "cpu":
            return t, lambda: t
        host = self._host("recv", t)
        if fill:
            host.copy_(t)
        return host, lambda: t.copy_(host)

    def recv(self, n: int, dtype: torch.dtype, device: torch.device) -> Tuple[Any, Callable[[], torch.Tensor]]:
        return self.inplace(torch.empty(n, dtype=dtype, device=device))


class StallReports:
    """Who waits in which collective, for the stall warning (Horovod's stall check). A rank that has waited
    ``REPORT_AFTER_S`` in a collective tells rank 0 so, and again when the wait ends, in small messages on a
    communicator of their own; rank 0, once it has waited ``stall_warning_s`` itself, reads them and names
    the ranks that are in none of our collectives (still computing, in a long evaluation, or hung). Shared
    by the ``Comm`` objects of one group of ranks, from any thread."""

    def __init__(self, mpi):
        self.mpi, self.rank = mpi, mpi.Get_rank()
        self._lock = threading.Lock()
        self._waiting: Dict[int, str] = {}  # rank 0: rank -> the collective it reported waiting in
        self._sends: List[Any] = []

    def tell(self, what: Optional[str]) -> None:
        """Tell rank 0 that this rank waits in ``what`` (None: no longer)."""
        with self._lock:
            self._sends = [r for r in self._sends if not r.Test()]
            self._sends.append(self.mpi.isend(what, dest=0, tag=STALL_TAG))

    def waiting(self) -> Dict[int, str]:
        """On rank 0: the other ranks that reported waiting, and where, from the reports received so far."""
        from mpi4py import MPI
        with self._lock:
            while True:
                status = MPI.Status()
                message = self.mpi.improbe(source=MPI.ANY_SOURCE, tag=STALL_TAG, status=status)
                if message is None:
                    return dict(self._waiting)
                what = message.recv()
                if what is None:
                    self._waiting.pop(status.Get_source(), None)
                else:
                    self._waiting[status.Get_source()] = what


class Comm:
    """MPI collectives on raw byte buffers (uint8 tensors on the CPU or a CUDA device: what a
    collective returns lies where its input does), counting what each rank sends and receives."""

    def __init__(self, mpi_comm: Optional[Any] = None, timeout_s: Optional[float] = None,
                 process_set: Optional[Any] = None, stall_warning_s: Optional[float] = None):
        PROCESS.start()
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise HvdDistefError(f"cannot use MPI ({exc}); {GLOO_HINT}") from exc
        # before any collective: another rank's exit may finalize MPI under this one
        if PROCESS.horovod_first and sys.modules["horovod.torch"].size() > 1:  # Horovod's, cached: no MPI call
            raise HvdDistefError(HOROVOD_FIRST)
        self.MPI = MPI
        check_not_gloo(MPI.COMM_WORLD.Get_size())
        if MPI.COMM_WORLD.Get_size() > 1:
            check_mpi(MPI, mpi_comm, process_set)
            PROCESS.abort_on_exception()
        self.timeout_s = _seconds("timeout_s", timeout_s, TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
        self.stall_warning_s = _seconds("stall_warning_s", stall_warning_s, STALL_WARNING_ENV,
                                        DEFAULT_STALL_WARNING_S)
        self.process_set = process_set
        base = PROCESS.communicator(mpi_comm, process_set)
        self.is_world = base == MPI.COMM_WORLD
        self.rank, self.size, self.stalls = base.Get_rank(), base.Get_size(), None  # until the duplicates exist
        self.mpi, self.stalls = PROCESS.duplicate(base, self.complete)
        self.rank = self.mpi.Get_rank()
        self.size = self.mpi.Get_size()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.shared_sent = self.shared_received = 0  # ``count_shared``: through memory, not MPI
        self.staging = Staging(cuda_aware_mpi(MPI))
        self.serial, self._names = PROCESS.next_serial(), 0
        self._parent: Optional["Comm"] = None  # ``split``: the Comm whose bytes this one's count toward too

    def unique_name(self, prefix: str) -> str:
        """A name for a Horovod operation of this ``Comm``'s owner, the same on every rank (optimizers and
        their buckets are built in the same order everywhere) and unlike any other's in this process."""
        self._names += 1
        return f"{prefix}.{self.serial}.{self._names}"

    def private(self) -> "Comm":
        """A ``Comm`` like this one on a new duplicate of its communicator (collective: every rank of it
        calls this together), with counters of its own: for an optimizer whose bucket thread runs
        collectives beside the script's other collectives (``MPIProcess``)."""
        other = copy.copy(self)
        other.mpi = PROCESS.idup(self.mpi, self.complete)
        other.bytes_sent = other.bytes_received = other.shared_sent = other.shared_received = 0
        other.serial, other._names = PROCESS.next_serial(), 0
        other.staging = Staging(self.staging.cuda_aware)
        other._parent = None
        return other

    def split(self, color: int, key: int) -> Optional["Comm"]:
        """A ``Comm`` on the ranks of this one that pass the same ``color`` (collective over this one:
        MPI_Comm_split), ranked by ``key``, or None where ``color`` is ``MPI.UNDEFINED``; its bytes count on
        this one too, so that an optimizer's ``comm_stats`` holds what its topology moved within groups of
        ranks (``hierarchical``: the ranks of a node, the nodes' leaders)."""
        mpi = self.mpi.Split(color, key)
        serial = PROCESS.next_serial()  # on every rank, also without a part: later Comms' names stay alike
        if mpi == self.MPI.COMM_NULL:
            return None
        other = copy.copy(self)
        other.mpi, other.rank, other.size, other.stalls = mpi, mpi.Get_rank(), mpi.Get_size(), None
        other.bytes_sent = other.bytes_received = other.shared_sent = other.shared_received = 0
        other.serial, other._names = serial, 0
        other.staging = Staging(self.staging.cuda_aware)
        other._parent = self
        return other

    def wait_until(self, what: str, done: Callable[[], bool]) -> None:
        """Poll ``done()``, giving the core away between polls, until it is true. After ``stall_warning_s``
        rank 0 warns, naming the ranks in none of our collectives (the others warn at twice the bound:
        rank 0 may be the one missing); after ``timeout_s`` (a peer rank died or hung) this rank says so on
        its stderr and aborts the job, so that no allocation burns waiting forever."""
        start = time.monotonic()
        reported = warned = False
        orphaned = None  # since when this thread's script has ended (a thread of ours: overlap's buckets)
        while not done():
            os.sched_yield()
            waited = time.monotonic() - start
            if waited < min(REPORT_AFTER_S, self.stall_warning_s / 4):
                continue
            if threading.current_thread() is not threading.main_thread() and not threading.main_thread().is_alive():
                orphaned = orphaned or time.monotonic()
                if time.monotonic() - orphaned > ORPHAN_GRACE_S:
                    self._abort(f"the script has ended while the buckets of a backward pass without step() still "
                                f"wait for the other ranks in {what}: the other ranks ran no such pass (a "
                                f"backward pass on this rank only?)")
            if not reported and self.rank != 0 and self.stalls is not None:
                self.stalls.tell(what)
                reported = True
            if not warned and waited > self.stall_warning_s * (1 if self.rank == 0 else 2):
                self._warn_stall(what, waited)
                warned = True
            if waited > self.timeout_s:
                self._abort(f"no progress for {self.timeout_s:.0f} s in {what}: a peer rank has died or hung, or "
                            f"stopped stepping early (uneven batches, hvd.join()) (the bound is timeout_s= of "
                            f"DistributedOptimizer or {TIMEOUT_ENV})")
        if reported:
            self.stalls.tell(None)

    def _abort(self, why: str) -> None:
        """Say why on stderr and abort the job: no allocation burns waiting forever."""
        sys.stderr.write(f"hvd_distef: rank {self.MPI.COMM_WORLD.Get_rank()}: {why}. Aborting the job.\n")
        sys.stderr.flush()
        self.MPI.COMM_WORLD.Abort(1)

    def _warn_stall(self, what: str, waited: float) -> None:
        where = f"hvd_distef: rank {self.rank} has waited {waited:.0f} s in {what}"
        if self.rank == 0 and self.stalls is not None:
            waiting = self.stalls.waiting()
            missing = [r for r in range(1, self.size) if r not in waiting]
            where += (f"; ranks in none of our collectives (still computing, in a long evaluation or "
                      f"checkpoint, or hung): {', '.join(map(str, missing)) or 'none'}")
            others = sorted(set(waiting.values()) - {what})
            if others:
                where += f"; other ranks wait in {', '.join(others)}"
        warnings.warn(f"{where}. The job goes on; it is aborted after timeout_s = {self.timeout_s:.0f} s of "
                      f"waiting (DistributedOptimizer's timeout_s= and stall_warning_s=, or {TIMEOUT_ENV} and "
                      f"{STALL_WARNING_ENV})", RuntimeWarning)

    def complete(self, what: str, *requests) -> None:
        """Wait until MPI ``requests`` complete, polling ``MPI_Test`` and giving the core away between
        polls, bounded by the timeout. Every collective of ours starts nonblocking and ends here, not in
        MPI's blocking wait: under ``MPI_THREAD_MULTIPLE`` Open MPI lets one waiting thread drive progress
        and parks the others on a condition variable, and Horovod's background thread is in an MPI call
        every cycle (1 ms by default, idle or not); a blocking wait of ours then handed progress back and
        forth with it, a few cycles more per step (BENCHMARKS.md, "Waiting in MPI beside Horovod's
        background thread")."""
        self.wait_until(what, requests[0].Test if len(requests) == 1
                        else lambda: self.MPI.Request.Testall(list(requests)))

    def _count(self, sent: float, received: float) -> None:
        self.bytes_sent += sent
        self.bytes_received += received
        if self._parent is not None:
            self._parent._count(sent, received)

    def count_shared(self, sent: int, received: int) -> None:
        """Count bytes moved through memory shared with this communicator's ranks, not through MPI (apart from
        ``bytes_sent``/``bytes_received``, which are the network's where ranks are on several hosts): what
        this rank wrote that the others read (sent), and what it read of theirs (received)."""
        self.shared_sent += sent
        self.shared_received += received
        if self._parent is not None:
            self._parent.count_shared(sent, received)

    def barrier(self, what: str) -> None:
        """Every rank of this communicator has arrived (MPI_Ibarrier, polled): what each wrote before it into
        memory they share is there for the others to read."""
        if self.size > 1:
            self.complete(f"MPI Barrier ({what})", self.mpi.Ibarrier())

    # --- byte collectives ---------------------------------------------------------------------
    # Each counts the bytes of the buffers it hands to MPI that leave or reach this rank: a rank's
    # own part of a collective never crosses the wire; gather and broadcast count as the flat trees
    # of point-to-point messages they stand for (SPEC §3). ``out``: a buffer of the result's size to
    # receive into, kept by the caller across steps (a fresh one page-faults every step), else a new
    # one. In a world of one, the result is the rank's own buffer itself: no copy, no MPI call.
    def _receive_into(self, out: Optional[torch.Tensor], nbytes: int, device) -> Tuple[Any, Callable[[], torch.Tensor]]:
        if out is None:
            return self.staging.recv(nbytes, torch.uint8, device)
        if out.numel() != nbytes or out.dtype != torch.uint8:
            raise ValueError(f"out has {out.numel()} {out.dtype} elements, the collective receives {nbytes} bytes")
        return self.staging.inplace(out)

    def gather(self, buf: torch.Tensor, root: int, out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Equal-size buffers from every rank, concatenated in rank order on ``root`` (None elsewhere)."""
        if self.size == 1:
            return buf
        into, result = (None, None) if self.rank != root else self._receive_into(out, buf.numel() * self.size,
                                                                                  buf.device)
        self.complete("MPI Gather", self.mpi.Igather(self.staging.send(buf), into, root=root))
        self._count(0, (self.size - 1) * buf.numel()) if self.rank == root else self._count(buf.numel(), 0)
        return None if result is None else result()

    def bcast(self, buf: torch.Tensor, root: int) -> torch.Tensor:
        """``root``'s buffer, in place on every rank."""
        return self.ibcast(buf, root).wait()

    def ibcast(self, buf: torch.Tensor, root: int) -> Pending:
        """``bcast`` started and left on the wire (MPI_Ibcast): its ``wait()`` gives ``root``'s buffer."""
        if self.rank == root:
            request = self.mpi.Ibcast(self.staging.send(buf), root=root)
            self._count((self.size - 1) * buf.numel(), 0)
            result = lambda: buf  # noqa: E731
        else:
            into, result = self.staging.inplace(buf)
            request = self.mpi.Ibcast(into, root=root)
            self._count(0, buf.numel())

        def wait() -> torch.Tensor:
            self.complete("MPI Bcast", request)
            return result()
        return Pending(wait, request.Test)

    def alltoallv(self, send: torch.Tensor, send_counts: List[int], recv_counts: List[int],
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rank j gets ``send[offset_j : offset_j + send_counts[j]]`` from every rank, concatenated in rank order."""
        if self.size == 1:
            return send
        into, result = self._receive_into(out, sum(recv_counts), send.device)
        self.complete("MPI Alltoallv", self.mpi.Ialltoallv([self.staging.send(send), send_counts], [into, recv_counts]))
        self._count(sum(send_counts) - send_counts[self.rank], sum(recv_counts) - recv_counts[self.rank])
        return result()

    def allgatherv(self, send: torch.Tensor, counts: List[int], out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Every rank's buffer (rank r's of ``counts[r]`` bytes), concatenated in rank order on all ranks.
        Where ``send`` already lies at this rank's place in ``out`` (CPU), it is not copied (MPI_IN_PLACE)."""
        if self.size == 1:
            return send
        into, result = self._receive_into(out, sum(counts), send.device)
        at = sum(counts[:self.rank])
        in_place = (out is not None and out.device.type == "cpu" and send.numel() == counts[self.rank]
                    and send.numel() > 0 and send.data_ptr() == out[at:].data_ptr())
        self.complete("MPI Allgatherv",
                      self.mpi.Iallgatherv(self.MPI.IN_PLACE if in_place else self.staging.send(send), [into, counts]))
        self._count((self.size - 1) * send.numel(), sum(counts) - counts[self.rank])
        return result()

    def send(self, buf: torch.Tensor, dest: int) -> None:
        self.complete(f"MPI Send to rank {dest}", self.mpi.Isend(self.staging.send(buf), dest=dest))
        self._count(buf.numel(), 0)

    def recv(self, nbytes: int, source: int, device: torch.device | str = "cpu",
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``nbytes`` from ``source``, as a uint8 tensor on ``device``."""
        into, result = self._receive_into(out, nbytes, torch.device(device))
        self.complete(f"MPI Recv from rank {source}", self.mpi.Irecv(into, source=source))
        self._count(0, nbytes)
        return result()

    def sendrecv(self, buf: torch.Tensor, dest: int, nbytes: int, source: int,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Send ``buf`` to ``dest`` while receiving ``nbytes`` from ``source`` (no deadlock in a ring)."""
        into, result = self._receive_into(out, nbytes, buf.device)
        self.complete(f"MPI Sendrecv with ranks {dest}/{source}", self.mpi.Irecv(into, source=source),
                      self.mpi.Isend(self.staging.send(buf), dest=dest))
        self._count(buf.numel(), nbytes)
        return result()

    def allreduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        """MPI's Allreduce (sum) of a float32 tensor over this communicator, in place (not counted:
        the caller counts it as a ring allreduce)."""
        into, result = self.staging.inplace(t, fill=True)
        self.complete("MPI Allreduce", self.mpi.Iallreduce(self.MPI.IN_PLACE, into, op=self.MPI.SUM))
        return result()

    def count_ring_allreduce(self, wire: torch.Tensor) -> None:
        """A buffer handed to a ring allreduce (Horovod's, or MPI's on large buffers) moves 2·(M−1)/M of
        its bytes each way on every rank (fractional)."""
        volume = 2 * (self.size - 1) * wire.numel() * wire.element_size() / self.size
        self._count(volume, volume)

    # --- small control messages -----------------------------------------------------------------
    def max_ints(self, values: List[int]) -> List[int]:
        """The element-wise maximum of an int vector over the ranks (one small allreduce)."""
        mine = np.asarray(values, dtype=np.int32)
        out = np.empty_like(mine)
        self.complete("MPI Allreduce (step agreement)", self.mpi.Iallreduce(mine, out, op=self.MPI.MAX))
        return out.tolist()

    def gather_obj(self, obj: Any, root: int, purpose: str = "") -> Optional[List[Any]]:
        """Every rank's picklable ``obj`` in rank order at ``root``, None elsewhere (not counted); ``purpose``
        names it in stall warnings."""
        mine = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
        sizes = np.zeros(self.size, dtype=np.int64)
        self.complete(f"MPI Gather (sizes){purpose}",
                      self.mpi.Igather(np.array([mine.size], dtype=np.int64), sizes, root=root))
        everything = np.empty(int(sizes.sum()) if self.rank == root else 0, dtype=np.uint8)
        self.complete(f"MPI Gatherv{purpose}", self.mpi.Igatherv(mine, [everything, sizes.tolist()]
                                                                 if self.rank == root else None, root=root))
        if self.rank != root:
            return None
        ends = np.cumsum(sizes)
        return [pickle.loads(everything[end - n:end].tobytes()) for n, end in zip(sizes, ends)]

    def allgather_obj(self, obj: Any) -> List[Any]:
        """Every rank's picklable ``obj``, in rank order (not counted: control messages)."""
        mine = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
        sizes = np.zeros(self.size, dtype=np.int64)
        self.complete("MPI Allgather (sizes)", self.mpi.Iallgather(np.array([mine.size], dtype=np.int64), sizes))
        everything = np.empty(int(sizes.sum()), dtype=np.uint8)
        self.complete("MPI Allgatherv", self.mpi.Iallgatherv(mine, [everything, sizes.tolist()]))
        ends = np.cumsum(sizes)
        return [pickle.loads(everything[end - n:end].tobytes()) for n, end in zip(sizes, ends)]
