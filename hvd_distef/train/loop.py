"""The training loop behind ``python -m hvd_distef.train``: data shards, the wrapped optimizer, per-epoch
metrics as JSON lines in ``--log-dir`` (rank 0), and one atomic checkpoint for the job (rank 0 writes it,
every rank reads it and takes its own part)."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Tuple

import torch
from tqdm import tqdm

from .. import Compression, DistributedOptimizer
from ..errors import HvdDistefError, on_every_rank
from ..topologies.base import RING_FORMULA
from .data import Dataset, load
from .environment import describe
from .files import CONFIG_FILE, METRICS_FILE, checkpoint_path
from .methods import HOROVOD_COMPRESSION, METHODS
from .models import build
from .stats import gradient_stats, optimizer_stats

class LrSchedule:
    """Per-iteration lr factor: linear warm-up from 1/ranks over ``warmup`` epochs, then step decay."""

    def __init__(self, steps_per_epoch: int, warmup: float, decay_epochs, factor: float, ranks: int):
        self.steps_per_epoch, self.warmup, self.decay_epochs = steps_per_epoch, warmup, list(decay_epochs)
        self.factor, self.ranks = factor, ranks

    def __call__(self, step: int) -> float:
        epoch = step / self.steps_per_epoch
        f = self.factor ** sum(epoch >= e for e in self.decay_epochs)
        if epoch < self.warmup:
            f *= 1 / self.ranks + (1 - 1 / self.ranks) * epoch / self.warmup
        return f


def lr_scheduler(opt: torch.optim.Optimizer, args, steps_per_epoch: int, ranks: int):
    """The CLI's lr schedule on ``opt`` (``--warmup-epochs``, ``--lr-decay-epochs``,
    ``--lr-decay-factor``): a ``LambdaLR`` of ``LrSchedule``, stepped once per iteration."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, LrSchedule(steps_per_epoch, args.warmup_epochs, args.lr_decay_epochs, args.lr_decay_factor, ranks))


def evaluate(hvd, model: torch.nn.Module, data: Dataset, rank: int, ranks: int) -> float:
    """Test accuracy over the whole test set, each rank scoring its own shard."""
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for x, y in data.test_batches(rank, ranks, 256):
            counts += torch.tensor([(model(x).argmax(1) == y).sum().item(), len(y)], dtype=torch.float64)
    model.train()
    counts = hvd.allreduce(counts, op=hvd.Sum, name="hvd_distef.train.eval")
    return (counts[0] / counts[1]).item()


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def job_state(hvd, opt, model, sched, **progress) -> dict:
    """The job's checkpoint at rank 0 (None elsewhere), collective: the model (alike on every rank), the
    optimizer's state (every rank's under ours, ``gathered_state_dict``; stock Horovod's is rank 0's), the
    scheduler, every rank's random state, and ``progress``."""
    optimizer = opt.gathered_state_dict() if isinstance(opt, DistributedOptimizer) else opt.state_dict()
    rng = hvd.allgather_object(torch.get_rng_state())
    if hvd.rank() != 0:
        return None
    return {**progress, "world_size": hvd.size(), "model": model.state_dict(), "optimizer": optimizer,
            "scheduler": sched.state_dict(), "rng": rng}


def load_checkpoint(hvd, path: Path, ranks: int) -> dict:
    """The job's checkpoint, read by every rank; every rank fails together if any rank cannot read it or it
    comes from another world size."""
    try:
        state = torch.load(path, weights_only=False)
        problem = None if state.get("world_size") == ranks else \
            f"it was written by {state.get('world_size')} ranks, this run has {ranks}"
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
        state, problem = None, f"cannot read it ({type(exc).__name__}: {exc})"
    problems = [f"rank {r}: {p}" for r, p in enumerate(hvd.allgather_object(problem)) if p]
    if problems:
        raise on_every_rank(HvdDistefError(f"cannot resume from {path}: " + "; ".join(problems)))
    return state


def build_optimizer(hvd, args: argparse.Namespace, model: torch.nn.Module) -> torch.optim.SGD:
    """torch's SGD wrapped in Horovod's DistributedOptimizer (``--method horovod``) or in ours."""
    sgd = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
                          weight_decay=args.weight_decay)
    if METHODS[args.method].get("optimizer") == "horovod":
        compression = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}[args.compression]
        return hvd.DistributedOptimizer(sgd, named_parameters=model.named_parameters(), compression=compression)
    compression = args.compression
    if args.block_size:
        compression = Compression.blocksign(block_size=args.block_size)
    return DistributedOptimizer(sgd, named_parameters=model.named_parameters(), compression=compression,
                                topology=args.topology, overlap=args.overlap, bucket_cap_mb=args.bucket_cap_mb,
                                error_decay=args.error_decay, local_size=args.local_size,
                                node_path=args.node_path)


class Traffic:
    """Bytes per step and seconds per epoch of the exchange, and where the bytes come from. Ours are
    ``opt.comm_stats()``'s: measured where we hand the buffers to MPI, SPEC §3's ring formula under
    ``topology="allreduce"``. Horovod exposes no counters, so for ``--method horovod`` the bytes are
    that formula too, 2·(M−1)/M·(4 or 2 bytes)·d sent and as many received per rank per step (d: the
    trainable parameters), and its seconds are None (its allreduce runs in Horovod's background
    thread, overlapping backward)."""

    def __init__(self, opt: torch.optim.SGD, args: argparse.Namespace, model: torch.nn.Module, ranks: int):
        self.opt = opt
        self.computed = METHODS[args.method].get("optimizer") == "horovod"
        d = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.ring_bytes = 2 * (ranks - 1) / ranks * HOROVOD_COMPRESSION.get(args.compression, 4) * d
        self.before = None

    def start_epoch(self) -> None:
        self.before = None if self.computed else self.opt.comm_stats()

    def end_epoch(self, steps: int) -> dict:
        """bytes_sent/received per step, comm/compress seconds of the epoch and where the bytes came from."""
        if self.computed:
            return {"bytes_sent_per_step": self.ring_bytes, "bytes_received_per_step": self.ring_bytes,
                    "comm_time_s": None, "compress_time_s": None, "bytes_source": RING_FORMULA}
        after, before = self.opt.comm_stats(), self.before
        return {"bytes_sent_per_step": (after["bytes_sent"] - before["bytes_sent"]) / steps,
                "bytes_received_per_step": (after["bytes_received"] - before["bytes_received"]) / steps,
                "comm_time_s": after["exchange_time_s"] - before["exchange_time_s"],
                "compress_time_s": after["compress_time_s"] - before["compress_time_s"],
                "bytes_source": after["bytes_source"]}


def train(args: argparse.Namespace) -> Tuple[float, float]:
    """Run the training; returns (final, best) test accuracy."""
    import horovod.torch as hvd
    hvd.init()
    rank, ranks = hvd.rank(), hvd.size()
    torch.manual_seed(args.seed)
    data = load(args.data, args.data_dir, args.subset)
    validation = None
    if args.validation:
        data, validation = data.hold_out(args.validation)
    steps = data.steps_per_epoch(ranks, args.batch_size)
    if steps == 0:
        raise on_every_rank(HvdDistefError(f"{len(data.train_y)} training examples are fewer than {ranks} ranks x "
                                           f"batch size {args.batch_size}: lower --batch-size or use more data"))
    model = build(args.model, data.in_shape, data.num_classes)
    opt = build_optimizer(hvd, args, model)
    traffic = Traffic(opt, args, model, ranks)
    sched = lr_scheduler(opt, args, steps, ranks)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    start_epoch, wall, best = 0, 0.0, 0.0
    if args.resume:
        state = load_checkpoint(hvd, checkpoint_path(args.log_dir), ranks)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"][rank])
        start_epoch, wall, best = state["epoch"], state["wall_time_s"], state["best_accuracy"]

    config = dict(vars(args), ranks=ranks, params=sum(p.numel() for p in model.parameters()),
                  data_dir=str(args.data_dir), log_dir=str(args.log_dir),
                  environment=describe(hvd.allgather_object))
    metrics = args.log_dir / METRICS_FILE
    if rank == 0:
        args.log_dir.mkdir(parents=True, exist_ok=True)
        (args.log_dir / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        if not args.resume and metrics.exists():
            metrics.unlink()
        print(f"hvd_distef.train: {args.method} ({args.compression} over {args.topology}), {args.model} on "
              f"{args.data}, {ranks} ranks, {config['params']} parameters, {steps} steps per epoch", flush=True)

    accuracy = 0.0
    for epoch in range(start_epoch, args.epochs):
        traffic.start_epoch()
        start = time.perf_counter()
        loss_sum = 0.0
        batches = data.train_batches(rank, ranks, args.batch_size, epoch, args.seed)
        stats = {}
        for i, (x, y) in enumerate(tqdm(batches, total=steps, desc=f"epoch {epoch + 1}/{args.epochs}",
                                        leave=False, disable=rank != 0 or not args.progress)):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if args.log_gradient_stats and i == steps - 1:
                stats["grad_stats"] = gradient_stats(model)
            opt.step()
            sched.step()
            loss_sum += loss.item()
        seconds = time.perf_counter() - start
        wall += seconds
        accuracy = evaluate(hvd, model, data, rank, ranks)
        best = max(best, accuracy)
        exchange = traffic.end_epoch(steps)
        by_rank = hvd.allgather_object((exchange["bytes_sent_per_step"], exchange["bytes_received_per_step"]))
        train_loss = hvd.allreduce(torch.tensor(loss_sum / steps), op=hvd.Average, name="hvd_distef.train.loss")
        record = {
            "epoch": epoch + 1, "method": args.method, "topology": args.topology, "compression": args.compression,
            "model": args.model, "data": args.data, "ranks": ranks, "steps": steps,
            "train_loss": train_loss.item(), "test_accuracy": accuracy, "epoch_time_s": seconds,
            "wall_time_s": wall, "step_time_s": seconds / steps, **exchange,
            "bytes_sent_by_rank": [sent for sent, _ in by_rank],
            "bytes_received_by_rank": [received for _, received in by_rank],
            "max_bytes_sent_per_step": max(sent for sent, _ in by_rank), "lr": opt.param_groups[0]["lr"],
        }
        if validation is not None:
            record["validation_accuracy"] = evaluate(hvd, model, validation, rank, ranks)
        if args.log_gradient_stats:
            record.update(stats, **optimizer_stats(hvd, opt))
        if rank == 0:
            with metrics.open("a") as f:
                f.write(json.dumps(record) + "\n")
            tqdm.write(f"epoch {epoch + 1:3d}/{args.epochs}  loss {record['train_loss']:.4f}  "
                       f"test acc {100 * accuracy:6.2f}%  {seconds:6.2f}s  "
                       f"sent {record['bytes_sent_per_step']:,.0f} B/step ({exchange['bytes_source']})  "
                       f"lr {record['lr']:.4g}")
        if args.checkpoint_every and (epoch + 1) % args.checkpoint_every == 0:
            state = job_state(hvd, opt, model, sched, epoch=epoch + 1, config=config, wall_time_s=wall,
                              best_accuracy=best)
            if rank == 0:
                save_checkpoint(checkpoint_path(args.log_dir), state)
    if rank == 0:
        print(f"hvd_distef.train: done, final test accuracy {100 * accuracy:.2f}% (best {100 * best:.2f}%), "
              f"metrics in {metrics}", flush=True)
    return accuracy, best
