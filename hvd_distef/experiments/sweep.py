"""Many training runs in one MPI job: ``mpirun -np M python -m hvd_distef.experiments.sweep PLAN.json``.

An experiment trains a hundred small models; launching each as its own ``mpirun`` would spend
seconds per run importing torch and Horovod. Here every rank runs the plan's trainings one after
another in one process, each exactly as ``python -m hvd_distef.train FLAGS`` would (the same
``cli.parse`` and ``loop.train``), and each writes its own ``--log-dir`` (``config.json``,
``metrics.jsonl``, and ``train.log``: rank 0's output of that run). A run gives the same figures here
as in a fresh process (``train`` seeds torch from ``--seed``; data order, initial weights and the
compressors' random streams follow from it; tests/test_experiments.py compares the two).

PLAN.json: ``{"runs": [[flag, ...], ...]}``, each a list of ``hvd_distef.train`` flags with its
``--log-dir``. A run that diverges (``NonFiniteGradientError``, raised on every rank together) or fails
with another of our errors leaves ``failure.json`` (``{"error", "message", "diverged"}``) in its
folder and the sweep goes on; anything else ends the job. Progress lines come from rank 0.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional

from ..errors import HvdDistefError, NonFiniteGradientError
from ..train import cli, loop
from ..train.files import METRICS_FILE
from .runs import FAILURE_FILE, LOG_FILE


def run_one(argv: List[str], rank: int) -> dict:
    """Train one run of the plan; rank 0's output goes to its ``train.log``. Returns what happened."""
    args = cli.parse(argv)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    (args.log_dir / FAILURE_FILE).unlink(missing_ok=True)
    start = time.perf_counter()
    log = open(args.log_dir / LOG_FILE, "w") if rank == 0 else contextlib.nullcontext()
    with log, contextlib.redirect_stdout(log) if rank == 0 else contextlib.nullcontext():
        try:
            final, _ = loop.train(args)
            outcome = {"final": final}
        except (HvdDistefError, ValueError) as exc:
            if rank == 0:
                traceback.print_exc(file=sys.stdout)
            outcome = {"error": type(exc).__name__, "message": str(exc),
                       "diverged": isinstance(exc, NonFiniteGradientError)}
    if "error" in outcome and rank == 0:
        (args.log_dir / FAILURE_FILE).write_text(json.dumps(outcome))
    outcome["seconds"] = time.perf_counter() - start
    return outcome


def summary(flags: List[str], outcome: dict) -> str:
    """One progress line: the run's folder, and its last validation accuracy when it holds examples out
    (a tuning run is judged on them, not on the test set), else its test accuracy."""
    log_dir = Path(flags[flags.index("--log-dir") + 1])
    if "error" in outcome:
        result = f"{'DIVERGED' if outcome['diverged'] else 'FAILED'} ({outcome['error']}: {outcome['message']})"
    else:
        last = json.loads((log_dir / METRICS_FILE).read_text().splitlines()[-1])
        key = "validation_accuracy" if "validation_accuracy" in last else "test_accuracy"
        result = f"{key.replace('_', ' ')} {100 * last[key]:.2f}%"
    return f"{log_dir.name}: {result} ({outcome['seconds']:.1f} s)"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="hvd_distef.experiments.sweep", description=__doc__.split("\n")[0])
    p.add_argument("plan", type=Path, help="JSON file: {\"runs\": [[hvd_distef.train flags...], ...]}")
    args = p.parse_args(argv)
    runs = json.loads(args.plan.read_text())["runs"]
    import horovod.torch as hvd  # after hvd_distef: MPI through mpi4py (hvd_distef/comm.py)
    hvd.init()
    rank = hvd.rank()
    for i, flags in enumerate(runs, 1):
        outcome = run_one(flags, rank)
        if rank == 0:
            print(f"  [{i}/{len(runs)}] {summary(flags, outcome)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
