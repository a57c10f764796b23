"""What a run's timings depend on besides the code (SPEC §5b): the launcher and its settings, the
threads and cores each rank has, how many ranks share a host, the CPU. ``describe`` is written into
every training run's ``config.json``; the comparison report prints it and names what differs between
contenders, since a setting that helps one contender (a Horovod cycle, a yield, a binding) must be
given to all of them or to none.
"""
from __future__ import annotations

import os
import socket
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

#: environment variables that change what a run measures (threads, Horovod's background thread, Open
#: MPI's waiting and binding, our kernels); unset ones are recorded as None (the library's default)
SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "HOROVOD_CYCLE_TIME", "HOROVOD_FUSION_THRESHOLD",
            "HOROVOD_CACHE_CAPACITY", "HOROVOD_HIERARCHICAL_ALLREDUCE", "HOROVOD_AUTOTUNE",
            "OMPI_MCA_mpi_yield_when_idle", "OMPI_MCA_hwloc_base_binding_policy", "OMPI_MCA_btl",
            "HVD_DISTEF_FORCE_TORCH", "HVD_DISTEF_CUDA_AWARE", "ATEN_CPU_CAPABILITY")
#: what each launcher sets in every rank's environment, in the order they are recognised
LAUNCHERS = (("HOROVOD_RANK", "horovodrun"), ("SLURM_STEP_ID", "srun"), ("OMPI_COMM_WORLD_SIZE", "mpirun"),
             ("PMI_SIZE", "mpiexec (PMI)"))


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (what ``lscpu`` prints), or "unknown"."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                "unknown")


def launcher(environ=os.environ) -> str:
    """Which launcher started this process, from the variables it sets ("none": a plain process)."""
    return next((name for var, name in LAUNCHERS if var in environ), "none")


def local(environ=os.environ) -> Dict[str, object]:
    """This process's part: CPU, cores it may run on, torch's threads, launcher, SETTINGS."""
    import torch
    from .. import _kernels
    return {"cpu": cpu_model(), "host_cores": os.cpu_count(), "rank_cores": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "launcher": launcher(environ),
            "compiled_kernels": _kernels.compiled is not None,
            "settings": {k: environ.get(k) for k in SETTINGS}}


def describe(allgather_object, environ=os.environ) -> Dict[str, object]:
    """The job's environment, the same dict on every rank (collective: every rank calls it with
    its ``allgather_object``, e.g. ``hvd.allgather_object``): rank 0's ``local`` part, the number of
    hosts and the most ranks on one of them, whether some host runs more ranks than it has cores
    (``oversubscribed``: ranks then share cores, and a helper thread that spins, such as Horovod's
    background thread, takes compute from its neighbours), and the keys in which ranks differ."""
    mine = local(environ)
    everyone: List[tuple] = allgather_object((socket.gethostname(), mine))
    per_host = Counter(host for host, _ in everyone)
    cores = {host: env["host_cores"] for host, env in everyone}
    first = everyone[0][1]
    return {**first, "ranks": len(everyone), "hosts": len(per_host), "ranks_per_host": max(per_host.values()),
            "oversubscribed": any(n > cores[h] for h, n in per_host.items()),
            "differs_between_ranks": sorted(k for k in first if any(env[k] != first[k] for _, env in everyone))}


def differences(environments: Dict[str, Optional[dict]]) -> Dict[str, Dict[str, object]]:
    """Setting -> {run: value} for every setting in which the runs' environments (``describe``)
    differ; a run without a recorded environment has "unknown" everywhere."""
    def flat(env: Optional[dict]) -> Dict[str, object]:
        out = {k: v for k, v in (env or {}).items() if k not in ("settings", "differs_between_ranks")}
        out.update((env or {}).get("settings", {}))
        return out
    flats = {run: flat(env) for run, env in environments.items()}
    found = {}
    for key in sorted({k for f in flats.values() for k in f}):
        values = {run: f.get(key, "unknown") for run, f in flats.items()}
        if len({repr(v) for v in values.values()}) > 1:
            found[key] = values
    return found
