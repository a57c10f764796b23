"""Shared pieces of the benchmarks: layer sizes of a real network, timing by medians, and the results
files that every figure of BENCHMARKS.md comes from (SPEC §5b).

A results file is ``benchmarks/results/NAME.json``: ``{"meta": {...}, "results": ...}``, where ``meta``
holds what a reader needs to place the figures: the CPU model and its cores, the date, the commit
(``+dirty`` when tracked files differed from it), the exact command, and the environment that changes
timings (threads, Horovod's and Open MPI's settings). ``benchmarks/record.py`` builds BENCHMARKS.md
from these files and nothing else.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]

# Parameter tensor sizes of torchvision's ResNet-50 (conv and fc weights; BN and biases folded out),
# the model of the paper's ImageNet runs.
RESNET50 = [9408, 4096, 36864, 16384, 16384, 16384, 36864, 16384, 16384, 36864, 16384, 32768, 147456, 65536,
            131072, 65536, 147456, 65536, 65536, 147456, 65536, 65536, 147456, 65536, 131072, 589824, 262144,
            524288, 262144, 589824, 262144, 262144, 589824, 262144, 262144, 589824, 262144, 262144, 589824,
            262144, 262144, 589824, 262144, 524288, 2359296, 1048576, 2097152, 1048576, 2359296, 1048576,
            1048576, 2359296, 1048576, 2048000]

#: environment variables that change what a benchmark measures; their values go into every results file
TIMING_ENV_PREFIXES = ("OMP_", "MKL_", "ATEN_", "HOROVOD_", "OMPI_MCA_", "HVD_DISTEF_")


def layer_sizes(total: int, pool: List[int] = RESNET50) -> List[int]:
    """Tensor sizes drawn in order (cycling) from a real network until they add up to ``total``."""
    sizes, i = [], 0
    while sum(sizes) < total:
        sizes.append(min(pool[i % len(pool)], total - sum(sizes)))
        i += 1
    return sizes


def median_times(fns: Dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 2) -> Dict[str, float]:
    """Median wall time in seconds of each function, run in turn within each repeat so that the
    noise of this shared machine falls on all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` prints it (the figures depend on it), or "unknown"."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown")


def cpu_flags() -> List[str]:
    """The vector extensions of this CPU that our kernels and torch's pick at run time."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in set(flags) if f in ("avx2", "avx512f", "avx512bw", "avx512vl", "fma"))


#: what a measurement runs: a change to these (tracked) makes a results file's commit ``+dirty``; docs and
#: tests do not
MEASURED_PATHS = ("hvd_distef", "cpp_ops", "benchmarks", "setup.py", ":(exclude)benchmarks/results")


def commit() -> str:
    """The commit of this checkout, with ``+dirty (paths)`` when the tracked files a measurement runs
    (``MEASURED_PATHS``) differ from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "HEAD") or "unknown"
    changed = git("diff", "HEAD", "--name-only", "--", *MEASURED_PATHS).split()
    return head + (f"+dirty ({', '.join(changed)})" if changed else "")


def meta(argv: Optional[Sequence[str]] = None) -> dict:
    """What places a figure: CPU, cores, date, commit, command, timing environment, versions."""
    import torch
    argv = [sys.executable, *sys.argv] if argv is None else list(argv)
    python = Path(argv[0])
    if python.is_absolute() and ROOT in python.parents:
        argv[0] = str(python.relative_to(ROOT))
    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": len(os.sched_getaffinity(0)),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": commit(), "command": shlex.join(argv),
            "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(TIMING_ENV_PREFIXES)},
            "python": platform.python_version(), "torch": torch.__version__}


def write_results(name: str, results, argv: Optional[Sequence[str]] = None, **extra_meta) -> Path:
    """``benchmarks/results/NAME.json`` with ``meta(argv)`` (plus ``extra_meta``) and ``results``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"meta": {**meta(argv), **extra_meta}, "results": results}, indent=1) + "\n")
    return path


def read_results(name: str, results_dir: Path = RESULTS) -> Optional[dict]:
    """The results file ``NAME.json`` as written by ``write_results``, or None where there is none."""
    path = results_dir / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None
