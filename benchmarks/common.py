"""Shared pieces of the benchmarks: layer sizes of a real network, timing by medians, JSON output."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

RESULTS = Path(__file__).resolve().parent / "results"

# Parameter tensor sizes of torchvision's ResNet-50 (conv and fc weights; BN and biases folded out),
# the model of the paper's ImageNet runs.
RESNET50 = [9408, 4096, 36864, 16384, 16384, 16384, 36864, 16384, 16384, 36864, 16384, 32768, 147456, 65536,
            131072, 65536, 147456, 65536, 65536, 147456, 65536, 65536, 147456, 65536, 131072, 589824, 262144,
            524288, 262144, 589824, 262144, 262144, 589824, 262144, 262144, 589824, 262144, 262144, 589824,
            262144, 262144, 589824, 262144, 524288, 2359296, 1048576, 2097152, 1048576, 2359296, 1048576,
            1048576, 2359296, 1048576, 2048000]


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


def write_json(name: str, payload) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=1))
    return path


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` prints it (the figures depend on it), or "unknown"."""
    import subprocess
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown")
