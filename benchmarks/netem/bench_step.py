"""Runs on every rank inside the emulated cluster: times optimizer steps per contender with synthetic
gradients (so that compute does not hide communication on 2 cores) and appends one record per
contender to --out (rank 0).

Contenders: stock Horovod (``horovod``: ``hvd.DistributedOptimizer`` at its defaults; ``horovod-fp16``:
with ``hvd.Compression.fp16``), and each topology of hvd_distef (blocksign; ``allreduce`` sends float32,
``majority_vote`` signs; ``hierarchical`` and ``hierarchical-leaders``: its two data paths inside a node).
Every contender runs in the same job, one after another, with the same launcher and environment. Stock
Horovod's allreduce of gradients set by hand runs in its ``synchronize()``, as for a parameter whose hook
never fired."""
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

import hvd_distef  # noqa: E402  (before hvd.init(): MPI is mpi4py's)
import horovod.torch as hvd  # noqa: E402
from mpi4py import MPI  # noqa: E402

from hvd_distef.topologies.base import RING_FORMULA  # noqa: E402

COMPRESSION = {"allreduce": "none", "majority_vote": "sign"}
#: stock Horovod's contenders: name -> hvd.Compression attribute
HOROVOD = {"horovod": "none", "horovod-fp16": "fp16"}
#: ``hierarchical``'s contenders: name -> its node_path
HIERARCHICAL = {"hierarchical": "slices", "hierarchical-leaders": "leaders"}


def link_bytes() -> tuple:
    """(sent, received) bytes so far on this namespace's link to the others (its node's), or (0, 0) outside one."""
    stats = Path("/sys/class/net/eth0/statistics")
    if not stats.is_dir():
        return 0, 0
    return int((stats / "tx_bytes").read_text()), int((stats / "rx_bytes").read_text())


def build(name: str, params, sgd: torch.optim.SGD, local_size=None):
    """The contender's optimizer and (compression, where its bytes come from)."""
    if name in HOROVOD:
        return (hvd.DistributedOptimizer(sgd, named_parameters=[(f"p{i}", p) for i, p in enumerate(params)],
                                         compression=getattr(hvd.Compression, HOROVOD[name])),
                HOROVOD[name], RING_FORMULA)
    compression = COMPRESSION.get(name, "blocksign")
    topology, extra = name, {}
    if name in HIERARCHICAL:
        topology, extra = "hierarchical", {"local_size": local_size, "node_path": HIERARCHICAL[name]}
    opt = hvd_distef.DistributedOptimizer(sgd, compression=compression, topology=topology, **extra)
    return opt, compression, None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, required=True)
    ap.add_argument("--topologies", nargs="+", required=True, help=f"contenders: {', '.join(HOROVOD)} or topologies")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first is the slowest)")
    ap.add_argument("--rate", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ranks-per-node", type=int, default=1, help="consecutive ranks sharing a node's link")
    args = ap.parse_args()
    hvd.init(comm=MPI.COMM_WORLD)
    world = MPI.COMM_WORLD
    sizes = layer_sizes(int(args.params))
    for name in args.topologies:
        params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
        gen = torch.Generator().manual_seed(world.rank)
        grads = [torch.randn(p.numel(), generator=gen) * 1e-3 for p in params]
        opt, compression, computed = build(
            name, params, torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4),
            args.ranks_per_node)
        times, link = [], (0, 0)
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                world.Barrier()
                link = link_bytes()
            for p, g in zip(params, grads):  # stock Horovod averages p.grad in place: give it the same each step
                p.grad = g.clone()
            world.Barrier()
            start = time.perf_counter()
            opt.step()
            elapsed = world.allreduce(time.perf_counter() - start, op=MPI.MAX)  # the slowest rank's step
            if step >= args.warmup:
                times.append(elapsed)
        if computed:  # SPEC §3's ring-allreduce volume: Horovod has no counters
            d, width = sum(sizes), 2 if compression == "fp16" else 4
            sent = received = 2 * (world.size - 1) / world.size * width * d
            source = computed
        else:
            stats = opt.comm_stats()
            sent, received = stats["bytes_sent"] / stats["steps"], stats["bytes_received"] / stats["steps"]
            source = stats["bytes_source"]
        world.Barrier()
        on_link = [(after - before) / args.steps for after, before in zip(link_bytes(), link)]
        everyone = world.gather((sent, received), root=0)
        nodes = world.gather(on_link if world.rank % args.ranks_per_node == 0 else None, root=0)
        if world.rank == 0:
            record = {"topology": name, "compression": compression, "ranks": world.size,
                      "params": sum(sizes), "tensors": len(sizes), "rate": args.rate,
                      "step_time_median_s": statistics.median(times), "step_times_s": times,
                      "bytes_sent_per_step": sent, "bytes_received_per_step": received,
                      "max_bytes_sent_per_step": max(s for s, _ in everyone),
                      "busiest_bytes_per_step": max(s + r for s, r in everyone), "bytes_source": source,
                      "ranks_per_node": args.ranks_per_node,
                      # what crossed each node's link (its interface's counters: TCP/IP headers, MPI's and
                      # Horovod's control messages and the timing collectives included)
                      "node_link_bytes_per_step": [n for n in nodes if n is not None]}
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"{name:>14} M={world.size} d={sum(sizes):,} {args.rate}: "
                  f"{1000 * record['step_time_median_s']:8.1f} ms/step, sent {sent:,.0f} B/step (rank 0, {source})",
                  flush=True)
        del opt, params
        gc.collect()


if __name__ == "__main__":
    main()
