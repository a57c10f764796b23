"""``python -m hvd_distef.train``: one training run, launched on every rank by horovodrun, mpirun or srun.

Methods are presets of compression and topology (``--compression``/``--topology`` override them);
hyper-parameters default to the paper's (momentum 0.9, Nesterov, weight decay 5e-4, step decay).

Two SGDM baselines, the same arithmetic on different schedules: ``horovod`` is the real
``horovod.torch.DistributedOptimizer`` (a hook per parameter starts its allreduce as soon as backward
has produced its gradient; Horovod's tensor fusion batches them; communication overlaps the rest of
backward), ``sgdm`` is ours with ``topology="allreduce"`` (every gradient fused into one buffer after
backward, one allreduce, no overlap).
Bad flags give a one-line error and exit code 2 on every rank, before any communication.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from ..compressors import REGISTRY as COMPRESSORS
from ..errors import HvdDistefError
from ..topologies import REGISTRY as TOPOLOGIES
from .data import CIFAR, LOADERS
from .files import checkpoint_path
from .methods import HOROVOD_COMPRESSION, METHODS
from .models import MODELS

class OneLineParser(argparse.ArgumentParser):
    """argparse, but errors are one line and exit 2 (every rank prints the same line)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="hvd_distef.train", description=__doc__.split("\n")[0],
                      epilog="methods: " + "; ".join(f"{k}: {v['help']}" for k, v in METHODS.items()))
    p.add_argument("--method", default="ef-blocksgdm", choices=sorted(METHODS))
    p.add_argument("--compression", choices=sorted(COMPRESSORS), help="override the method's compressor")
    p.add_argument("--topology", choices=sorted(TOPOLOGIES), help="override the method's topology")
    p.add_argument("--local-size", type=positive_int,
                   help="--topology hierarchical: ranks per node (default: the ranks that share memory)")
    p.add_argument("--node-path", choices=("slices", "leaders"),
                   help="--topology hierarchical: how a node's ranks share its work (default: slices)")
    p.add_argument("--block-size", type=positive_int, help="blocksign: split tensors into blocks of at most N")
    p.add_argument("--overlap", action="store_true",
                   help="exchange gradient buckets during backward (DistributedOptimizer(overlap=True))")
    p.add_argument("--bucket-cap-mb", type=positive_float, default=25.0, help="MiB per bucket with --overlap")
    p.add_argument("--error-decay", type=float, metavar="BETA",
                   help="decay both errors by BETA each step instead of rescaling them by the lr ratio")
    p.add_argument("--model", default="mlp", choices=sorted(MODELS))
    p.add_argument("--data", default="digits", choices=sorted(LOADERS))
    p.add_argument("--data-dir", type=Path, help="folder with the CIFAR archive or its extracted folder")
    p.add_argument("--subset", type=positive_int, help="use only the first N training examples")
    p.add_argument("--validation", type=int, default=0, metavar="N",
                   help="hold the last N training examples (after --subset) out of training and score them "
                        "each epoch as validation_accuracy: an lr is chosen on them, not on the test set")
    p.add_argument("--epochs", type=positive_int, default=30)
    p.add_argument("--batch-size", type=positive_int, default=32, help="per worker")
    p.add_argument("--lr", type=positive_float, help="default: the method's")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--no-nesterov", dest="nesterov", action="store_false")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--lr-decay-epochs", type=positive_int, nargs="*", default=[],
                   help="multiply the lr by --lr-decay-factor at these epochs")
    p.add_argument("--lr-decay-factor", type=positive_float, default=0.1)
    p.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up from lr/ranks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", type=Path, default=Path("runs/latest"))
    p.add_argument("--checkpoint-every", type=positive_int, help="epochs between checkpoints (in --log-dir)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --log-dir")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--log-gradient-stats", action="store_true",
                   help="add per-layer gradient magnitudes, blockwise and whole-buffer δ, partial-sum "
                        "densities and error norms to each epoch's metrics (hvd_distef/train/stats.py)")
    return p


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    preset = METHODS[args.method]
    args.compression = args.compression or preset["compression"]
    args.topology = args.topology or preset["topology"]
    args.lr = args.lr or preset["lr"]
    for given, flag in ((args.local_size, "--local-size"), (args.node_path, "--node-path")):
        if given and args.topology != "hierarchical":
            p.error(f"{flag} is for --topology hierarchical, not {args.topology}")
    if preset.get("optimizer") == "horovod":
        if args.topology != preset["topology"]:
            p.error(f"--topology {args.topology}: --method horovod is Horovod's own allreduce; "
                    "use --method sgdm or an ef-* method to choose a topology")
        if args.compression not in HOROVOD_COMPRESSION:
            p.error(f"--compression {args.compression}: --method horovod takes "
                    f"{' or '.join(HOROVOD_COMPRESSION)} (hvd.Compression)")
        if args.block_size:
            p.error("--block-size is for blocksign; --method horovod sends float32 or fp16")
        if args.overlap:
            p.error("--overlap is ours; --method horovod always overlaps (its own hooks and fusion)")
        if args.log_gradient_stats:
            p.error("--log-gradient-stats reads p.grad before step(), which Horovod's hooks may be "
                    "averaging in place; use --method sgdm for the SGDM baseline's statistics")
    if args.error_decay is not None and not 0 <= args.error_decay <= 1:
        p.error(f"--error-decay must be in [0, 1], got {args.error_decay}")
    if not 0 <= args.momentum < 1:
        p.error(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.nesterov and args.momentum == 0:
        args.nesterov = False
    if args.validation < 0:
        p.error(f"--validation must be >= 0 (examples held out), got {args.validation}")
    if args.weight_decay < 0:
        p.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.data in CIFAR:
        if args.data_dir is None:
            p.error(f"--data {args.data} needs --data-dir")
        if not args.data_dir.is_dir():
            p.error(f"--data-dir {args.data_dir} is not a folder")
    if args.resume and not checkpoint_path(args.log_dir).is_file():
        p.error(f"--resume: no checkpoint {checkpoint_path(args.log_dir)}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(argv)
    from .loop import train  # heavy imports (Horovod, MPI) only once the flags are known to be good
    try:
        train(args)
    except (HvdDistefError, ValueError) as exc:
        print(f"hvd_distef.train: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
