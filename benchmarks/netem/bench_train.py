"""Runs on every rank (inside the emulated cluster, or under a plain mpirun): real training of one
model on real data by several methods, interleaved, and one JSON record per method (rank 0).

Each method is a list of ``python -m hvd_distef.train`` flags (``--method horovod``,
``--method ef-blocksgdm --topology sharded``, ...), parsed by the training CLI and built by its
``build_optimizer``, so a flag the CLI learns is a method here too. Every method trains its own copy
of the model from the same initial weights on the same batches; the methods take turns, one eval
interval each, so the noise of the shared cores falls on all of them alike.

A step is ``zero_grad``, forward, backward and ``step`` after a barrier; its time is the slowest
rank's. The lr follows the CLI's schedule (``--lr-decay-epochs``, ``--warmup-epochs``), stepped per
iteration as the CLI does. The training time of a method is the sum of its step times (evaluation is not counted).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import horovod.torch as hvd
from mpi4py import MPI

from hvd_distef.train.cli import parse
from hvd_distef.train.data import load
from hvd_distef.train.loop import Traffic, build_optimizer, evaluate, lr_scheduler
from hvd_distef.train.models import build


class Contender:
    """One method: its model, optimizer, byte counters, batches and the curve it has drawn so far."""

    def __init__(self, label: str, flags: list, common: list, data, ranks: int):
        self.label, self.args = label, parse([*flags, *common])
        torch.manual_seed(self.args.seed)
        self.model = build(self.args.model, data.in_shape, data.num_classes)
        self.opt = build_optimizer(hvd, self.args, self.model)
        self.schedule = lr_scheduler(self.opt, self.args, data.steps_per_epoch(ranks, self.args.batch_size), ranks)
        hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
        self.traffic = Traffic(self.opt, self.args, self.model, ranks)
        self.traffic.start_epoch()
        self.step_times, self.train_time, self.curve = [], 0.0, []

    def batches(self, data, rank: int, ranks: int, epochs: int):
        for epoch in range(epochs):
            yield from data.train_batches(rank, ranks, self.args.batch_size, epoch, self.args.seed)

    def step(self, world, x, y) -> None:
        world.Barrier()
        start = time.perf_counter()
        self.opt.zero_grad()
        torch.nn.functional.cross_entropy(self.model(x), y).backward()
        self.opt.step()
        elapsed = world.allreduce(time.perf_counter() - start, op=MPI.MAX)
        self.schedule.step()  # the CLI's lr schedule (--lr-decay-epochs, --warmup-epochs), outside the timing
        self.step_times.append(elapsed)
        self.train_time += elapsed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", required=True, help='JSON object: label -> list of hvd_distef.train flags')
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--evals-per-epoch", type=int, default=4, help="test-accuracy points per epoch")
    ap.add_argument("--rate", default="local", help="the link rate, for the record")
    ap.add_argument("--out", required=True, help="JSON lines file, one record per method (appended)")
    ap.add_argument("common", nargs=argparse.REMAINDER, help="-- flags for every method (--model, --data, ...)")
    args = ap.parse_args()
    common = [a for a in args.common if a != "--"]
    hvd.init(comm=MPI.COMM_WORLD)
    world, rank, ranks = MPI.COMM_WORLD, hvd.rank(), hvd.size()
    methods = json.loads(args.methods)
    first = parse([*next(iter(methods.values())), *common])
    data = load(first.data, first.data_dir, first.subset)
    contenders = [Contender(label, flags, common, data, ranks) for label, flags in methods.items()]
    streams = [c.batches(data, rank, ranks, args.epochs) for c in contenders]
    per_epoch = data.steps_per_epoch(ranks, first.batch_size)
    steps, every = args.epochs * per_epoch, max(1, per_epoch // args.evals_per_epoch)
    done = 0
    while done < steps:
        chunk = min(every, steps - done)
        for c, stream in zip(contenders, streams):
            for _ in range(chunk):
                c.step(world, *next(stream))
            c.curve.append((done + chunk, c.train_time, evaluate(hvd, c.model, data, rank, ranks),
                            c.opt.param_groups[0]["lr"]))
        done += chunk
    for c in contenders:
        exchange = c.traffic.end_epoch(len(c.step_times))
        by_rank = world.gather((exchange["bytes_sent_per_step"], exchange["bytes_received_per_step"]), root=0)
        if rank == 0:
            record = {"label": c.label, "flags": methods[c.label], "common": common, "method": c.args.method,
                      "topology": c.args.topology, "compression": c.args.compression, "model": c.args.model,
                      "data": c.args.data, "params": sum(p.numel() for p in c.model.parameters()),
                      "ranks": ranks, "rate": args.rate, "batch_size": c.args.batch_size, "steps": steps,
                      "step_time_median_s": statistics.median(c.step_times), "step_times_s": c.step_times,
                      "train_time_s": c.train_time, "final_accuracy": c.curve[-1][2],
                      "curve": [{"step": s, "train_time_s": t, "test_accuracy": a, "lr": lr} for s, t, a, lr in c.curve],
                      "bytes_sent_per_step": exchange["bytes_sent_per_step"],
                      "max_bytes_sent_per_step": max(s for s, _ in by_rank),
                      "busiest_bytes_per_step": max(s + r for s, r in by_rank),
                      "bytes_received_per_step": exchange["bytes_received_per_step"],
                      "bytes_source": exchange["bytes_source"]}
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"{c.label:>24} M={ranks} {args.rate}: {1000 * record['step_time_median_s']:8.1f} ms/step, "
                  f"final acc {100 * record['final_accuracy']:.2f}%, sent {record['bytes_sent_per_step']:,.0f} B/step "
                  f"({record['bytes_source']})", flush=True)


if __name__ == "__main__":
    main()
