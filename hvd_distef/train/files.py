"""The files a training run writes in its ``--log-dir``: the configuration it ran with, one JSON line of
metrics per epoch, and the job's checkpoint (one file, every rank's state in it). Imports nothing of ours: the report and the experiments read
runs without starting MPI."""
from __future__ import annotations

from pathlib import Path

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


def checkpoint_path(log_dir: Path) -> Path:
    return log_dir / "checkpoint" / "job.pt"
