"""One rank's whole ``opt.step()`` on every path a user can reach, against a stock torch SGD step
timed in turn in the same run (issue 21, item 9).

A path is a topology and a compressor: ps, sharded, tree, ring and allgather with none, fp16, sign,
blocksign, blocksign(block_size=4096), topk, randomk and qsgd; allreduce with none and fp16;
majority_vote with sign and blocksign; and Horovod's own ``hvd.Compression.none`` / ``.fp16`` classes
as a ported script passes them (under ps, the default topology, and allreduce). The parameters are
ResNet-18's 62 tensors (11.7M float32; ``--model resnet50-26m``: the 20 larger tensors of ResNet-50,
26M, of ``benchmarks/step.py``), gradients already computed; lr 0.1, momentum 0.9, nesterov, weight
decay 5e-4 for both optimizers.

Targets (per path, printed and written):
- "1.5x stock": the whole step within 1.5x the stock ``torch.optim.SGD`` step on the same parameters;
- for the compressors whose compression is costly in itself (topk's selection, randomk's draw,
  qsgd's random rounding): "1.5x stock + own", the step within 1.5x the stock step plus the
  compressor's own cost: its ``compress`` and its ``decompress`` of the whole vector, each called
  alone (timed in turn too; decompress on payloads it has not seen), as many times as SPEC §1 calls
  them on one rank (``compressor_calls``): the worker compresses and subtracts Δ from p, the server
  decompresses the M payloads, compresses and subtracts, and Δ̃ is decompressed for the update
  (allgather: no server, every rank decompresses the M payloads).

Each path is built alone and timed against the stock step within each repeat (``median_times``), so
the noise of a shared machine falls on both; the ratio of the medians is the result. A memory copy of
one vector of the model's size is timed in turn too, and both steps are also given in such copies:
the stock step's per-tensor passes run in cache where its tensors fit (most of ResNet-18's), while a
step on the fused vector streams it from memory pass after pass, so the stock step's figure in copies
moves with what else shares the cache.

Under ``mpirun -np 2`` (a world of two; one process per rank) the exchange is real: for ps and
sharded with none and blocksign (``--paths`` for others), each rank also times, in turn, the raw
exchange those topologies make of the float32 gradient (ps: MPI Gather and Bcast of 4d bytes;
sharded: Alltoallv and Allgatherv of its shards; allreduce: Horovod's allreduce of the fused vector)
and stock Horovod's step (``hvd.DistributedOptimizer``
at its defaults: allreduce, then the SGD step). The target there: ours within the raw exchange plus
1.5x the stock SGD step. Rank 0 writes the results.

    .venv/bin/python benchmarks/step_paths.py [--model resnet18|resnet50-26m] [--repeats R] [--paths ps:none ...]
    mpirun -np 2 .venv/bin/python benchmarks/step_paths.py            # writes step_paths_np2
"""
from __future__ import annotations

import argparse
import gc
from typing import Dict, List

import torch

import hvd_distef  # before horovod's init: hvd_distef starts MPI (comm.initialize_mpi)
import horovod.torch as hvd
from hvd_distef import Compression
from hvd_distef.compressors import get_compressor
from hvd_distef.horovod_args import compression_name

from common import cpu_model, median_times, write_results

#: the 20 larger tensors of ResNet-50 (benchmarks/step.py's set): 26M float32
RESNET50_26M = ([2359296] * 6 + [2097152, 2048000, 1048576] * 2
                + [589824, 524288, 262144, 131072, 65536, 36864, 16384, 9408])
EF_TOPOLOGIES = ("ps", "sharded", "tree", "ring", "allgather")
EF_COMPRESSORS = ("none", "fp16", "sign", "blocksign", "blocksign4096", "topk", "randomk", "qsgd")
COSTLY = ("topk", "randomk", "qsgd")
HYPER = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)


def compressors() -> Dict[str, object]:
    """What a user passes as ``compression=``, by the label of the table."""
    return {"none": "none", "fp16": "fp16", "sign": "sign", "blocksign": "blocksign",
            "blocksign4096": Compression.blocksign(block_size=4096), "topk": "topk", "randomk": "randomk",
            "qsgd": "qsgd", "hvd.none": hvd.Compression.none, "hvd.fp16": hvd.Compression.fp16}


def all_paths() -> List[str]:
    paths = [f"{t}:{c}" for t in EF_TOPOLOGIES for c in EF_COMPRESSORS]
    paths += ["ps:hvd.none", "ps:hvd.fp16", "allreduce:none", "allreduce:fp16", "allreduce:hvd.none",
              "allreduce:hvd.fp16", "majority_vote:sign", "majority_vote:blocksign"]
    return paths


def tensor_sizes(model: str) -> List[int]:
    if model == "resnet50-26m":
        return list(RESNET50_26M)
    from hvd_distef.train.models import MODELS
    return [p.numel() for p in MODELS[model]((3, 32, 32), 1000).parameters()]


def own_costs(compression, numel: int, calls: int):
    """The compressor's ``compress`` and ``decompress`` of the whole vector, each called alone:
    compress on one instance, decompress on another, of ``calls`` payloads in turn (no payload twice:
    none is decompressed from what an earlier call kept)."""
    compressor = get_compressor(compression_name(compression)).for_stream(0)
    other = compressor.for_stream(1)
    x = torch.randn(numel) * 1e-3
    payloads = [compressor.compress(x) for _ in range(calls)]
    turn = iter(range(10**9))
    return (lambda: compressor.compress(x),
            lambda: other.decompress(payloads[next(turn) % calls]))


def compressor_calls(topology: str, world: int) -> tuple:
    """(compress, decompress) calls of the whole vector per step on one rank in SPEC §1 with a generic
    compressor: the worker's C(p) and p − Δ; the server's mean of M payloads, C(p̃) and p̃ − Δ̃; Δ̃ for
    the update. allgather: the worker's two, and the M payloads every rank averages."""
    return (1, 1 + world) if topology == "allgather" else (2, 3 + world)


def raw_exchange(topology: str, d: torch.Tensor):
    """The MPI collectives ``topology`` makes, on the raw float32 vector (the exchange of ``none``
    without our machinery), into buffers allocated once."""
    if topology == "allreduce":  # Horovod's allreduce of the fused vector, as the topology calls it
        wire = d.clone()
        return lambda: hvd.allreduce_(wire, op=hvd.Average, name="step_paths.raw")
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    size, rank = comm.Get_size(), comm.Get_rank()
    wire = d.view(torch.uint8).numpy()
    n = wire.size
    if topology == "ps":
        gathered = torch.empty(size * n, dtype=torch.uint8).numpy() if rank == 0 else None
        out = torch.empty(n, dtype=torch.uint8).numpy()

        def ps():
            comm.Gather(wire, gathered, root=0)
            comm.Bcast(wire if rank == 0 else out, root=0)
        return ps
    counts = [n // size // 4 * 4] * (size - 1)
    counts.append(n - sum(counts))
    mine = torch.empty(counts[rank] * size, dtype=torch.uint8).numpy()
    everything = torch.empty(n, dtype=torch.uint8).numpy()
    shard = torch.empty(counts[rank], dtype=torch.uint8).numpy()

    def sharded():
        comm.Alltoallv([wire, counts], [mine, [counts[rank]] * size])
        comm.Allgatherv(shard, [everything, counts])
    return sharded


def measure(path: str, params, repeats: int, world: int) -> dict:
    topology, label = path.split(":")
    compression = compressors()[label]
    stock = torch.optim.SGD(params, **HYPER)
    ours = hvd_distef.DistributedOptimizer(torch.optim.SGD(params, **HYPER), compression=compression,
                                           topology=topology)
    numel = sum(p.numel() for p in params)
    src, dst = torch.randn(numel), torch.empty(numel)
    # a memory copy of one vector of the model's size: the unit of the DRAM traffic of a pass
    fns = {"stock": stock.step, "ours": ours.step, "copy": lambda: dst.copy_(src)}
    costly = label in COSTLY
    if costly:
        fns["compress"], fns["decompress"] = own_costs(compression, numel, repeats + 2)
    if world > 1:
        grads = torch.cat([p.grad.reshape(-1) for p in params])
        if topology in ("ps", "sharded", "allreduce"):
            fns["raw_exchange"] = raw_exchange(topology, grads)
        horovod = hvd.DistributedOptimizer(torch.optim.SGD(params, **HYPER))
        fns["horovod"] = horovod.step
    t = median_times(fns, repeats=repeats, warmup=2)
    del ours, stock
    gc.collect()
    row = {"path": path, "topology": topology, "compression": label, "ms": 1000 * t["ours"],
           "stock_ms": 1000 * t["stock"], "ratio": t["ours"] / t["stock"], "copy_ms": 1000 * t["copy"],
           "copies": t["ours"] / t["copy"], "stock_copies": t["stock"] / t["copy"]}
    limit = 1.5 * t["stock"]
    row["target"] = "1.5x stock"
    if costly:
        n_c, n_d = compressor_calls(topology, world)
        own = n_c * t["compress"] + n_d * t["decompress"]
        row.update(compress_ms=1000 * t["compress"], decompress_ms=1000 * t["decompress"], own_ms=1000 * own,
                   compressor_calls=[n_c, n_d], target=f"1.5x stock + own ({n_c}C+{n_d}D)")
        limit += own
    if "raw_exchange" in t:
        row.update(raw_exchange_ms=1000 * t["raw_exchange"], target=row["target"] + " + raw exchange")
        limit += t["raw_exchange"]
    if "horovod" in t:
        row.update(horovod_ms=1000 * t["horovod"], ratio_to_horovod=t["ours"] / t["horovod"])
    row.update(target_ms=1000 * limit, met=t["ours"] <= limit)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50-26m"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--paths", nargs="+", default=None, help="topology:compression (default: all; at 2 ranks: "
                    "ps and sharded with none and blocksign)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1, as OMP_NUM_THREADS=1)")
    ap.add_argument("--name", default=None, help="results file name (default step_paths[_MODEL][_npM])")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hvd.init()
    world = hvd.size()
    paths = args.paths or (all_paths() if world == 1 else [f"{t}:{c}" for t in ("ps", "sharded")
                                                            for c in ("none", "blocksign")])
    unknown = [p for p in paths if p not in all_paths()]
    if unknown:
        raise SystemExit(f"unknown paths {unknown}; choose from {all_paths()}")
    torch.manual_seed(hvd.rank())
    sizes = tensor_sizes(args.model)
    params = [torch.nn.Parameter(torch.randn(n) * 0.01) for n in sizes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    say = print if hvd.rank() == 0 else (lambda *a, **k: None)
    say(f"{cpu_model()}; {args.model}: {sum(sizes) / 1e6:.2f}M params in {len(sizes)} tensors; {world} rank(s), "
        f"{args.threads} thread(s) each; compiled kernels: {hvd_distef._kernels.compiled is not None}")
    say(f"{'path':<26} {'ms':>8} {'stock ms':>8} {'ratio':>6}  {'target':<34} {'target ms':>9}  met  "
        f"(in copies of the vector: ours / stock)")
    measure(paths[0], params, 1, world)  # a warm-up, thrown away
    rows = []
    for path in paths:
        row = measure(path, params, args.repeats, world)
        rows.append(row)
        say(f"{path:<26} {row['ms']:8.1f} {row['stock_ms']:8.1f} {row['ratio']:5.2f}x  {row['target']:<34} "
            f"{row['target_ms']:9.1f}  {'yes' if row['met'] else 'NO '}"
            f"  ({row['copies']:.1f} / {row['stock_copies']:.1f})"
            + (f"  (own {row['own_ms']:.1f} ms)" if "own_ms" in row else "")
            + (f"  (raw exchange {row['raw_exchange_ms']:.1f} ms)" if "raw_exchange_ms" in row else "")
            + (f"  (stock Horovod {row['horovod_ms']:.1f} ms)" if "horovod_ms" in row else ""), flush=True)
    if hvd.rank() == 0:
        name = args.name or "step_paths" + ("" if args.model == "resnet18" else "_" + args.model.replace("-", "_")) \
            + ("" if world == 1 else f"_np{world}")
        path = write_results(name, {"model": args.model, "params": sum(sizes), "tensors": len(sizes), "ranks": world,
                                    "threads": args.threads, "repeats": args.repeats,
                                    "compiled_kernels": hvd_distef._kernels.compiled is not None, "paths": rows},
                             cpu=cpu_model())
        missed = [r["path"] for r in rows if not r["met"]]
        print(f"{len(rows) - len(missed)} of {len(rows)} paths meet their target"
              + (f"; missed: {', '.join(missed)}" if missed else ""))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
