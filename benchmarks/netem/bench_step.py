"""Runs on every rank inside the emulated cluster: times optimizer steps per topology with
synthetic gradients (so that compute does not hide communication on 2 cores) and appends one
record per topology to --out (rank 0)."""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import layer_sizes  # noqa: E402

import horovod.torch as hvd  # noqa: E402
from mpi4py import MPI  # noqa: E402

import hvd_distef  # noqa: E402

COMPRESSION = {"allreduce": "none", "majority_vote": "sign"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, required=True)
    ap.add_argument("--topologies", nargs="+", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rate", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    hvd.init(comm=MPI.COMM_WORLD)
    world = MPI.COMM_WORLD
    sizes = layer_sizes(int(args.params))
    for topology in args.topologies:
        params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
        gen = torch.Generator().manual_seed(world.rank)
        for p in params:
            p.grad = torch.randn(p.numel(), generator=gen) * 1e-3
        compression = COMPRESSION.get(topology, "blocksign")
        opt = hvd_distef.DistributedOptimizer(
            torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4),
            compression=compression, topology=topology)
        times = []
        for step in range(args.warmup + args.steps):
            world.Barrier()
            start = time.perf_counter()
            opt.step()
            elapsed = world.allreduce(time.perf_counter() - start, op=MPI.MAX)  # the slowest rank's step
            if step >= args.warmup:
                times.append(elapsed)
        stats = opt.comm_stats()
        sent = stats["bytes_sent"] / stats["steps"]
        everyone = world.gather(sent, root=0)
        if world.rank == 0:
            record = {"topology": topology, "compression": compression, "ranks": world.size,
                      "params": sum(sizes), "tensors": len(sizes), "rate": args.rate,
                      "step_time_median_s": statistics.median(times), "step_times_s": times,
                      "bytes_sent_per_step": sent, "max_bytes_sent_per_step": max(everyone),
                      "bytes_received_per_step": stats["bytes_received"] / stats["steps"]}
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"{topology:>14} M={world.size} d={sum(sizes):,} {args.rate}: "
                  f"{1000 * record['step_time_median_s']:8.1f} ms/step, sent {sent:,.0f} B/step (rank 0)", flush=True)
        del opt, params
        gc.collect()


if __name__ == "__main__":
    main()
