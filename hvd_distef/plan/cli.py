"""``python -m hvd_distef.plan``: the predicted step per method and where its time goes, per link and
rank count, and the bandwidth where compression stops paying.

    python -m hvd_distef.plan --model resnet50 --ranks 8 64 512 1024 --ranks-per-node 8 \\
        --link 10gbit,25gbit,100gbit [--compute-ms 180] [--device-profile epyc-core|FILE.json] [--plot plan.png]
    mpirun -np 2 --host a,b python -m hvd_distef.plan --measure-link ...   # alpha and bandwidth a -> b

Unless given, the model's forward + backward and the device profile are measured here (one thread,
tens of seconds for ResNet-50); progress and results come from rank 0 only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from dataclasses import replace
from typing import List, Optional

from . import model, report
from .device import DeviceProfile, load_profile

#: latency of one message between nodes when --latency-us is not given: MPI over TCP up to 10 Gbit/s,
#: typical RoCE/InfiniBand above (s)
DEFAULT_LATENCY = ((10e9, 30e-6), (25e9, 10e-6), (math.inf, 3e-6))
RATE_UNITS = {"tbit": 1e12, "gbit": 1e9, "mbit": 1e6, "kbit": 1e3}
LAUNCHED_ENVS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")


def parse_rate(rate: str) -> float:
    """'10gbit' -> bytes per second (1.25e9); units tbit, gbit, mbit, kbit (bits per second)."""
    text = rate.strip().lower()
    for unit, scale in RATE_UNITS.items():
        if text.endswith(unit):
            try:
                value = float(text[:-len(unit)])
            except ValueError:
                break
            if value > 0:
                return value * scale / 8
    raise ValueError(f"--link {rate!r}: expected a positive rate with a unit, e.g. 10gbit, 25gbit, 100gbit, 800mbit")


def default_latency(bandwidth: float) -> float:
    return next(alpha for bits, alpha in DEFAULT_LATENCY if 8 * bandwidth <= bits)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m hvd_distef.plan", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet50", help="a model the plan knows (nets.INPUTS)")
    ap.add_argument("--params", type=int, help="instead of a model's: this many parameters (needs --compute-ms)")
    ap.add_argument("--tensors", type=int, default=100, help="with --params: parameter tensors (blocksign blocks)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 512, 1024])
    ap.add_argument("--ranks-per-node", type=int, default=8)
    ap.add_argument("--link", default="10gbit,25gbit,100gbit", help="node link rates, comma-separated")
    ap.add_argument("--latency-us", type=float, help="latency of one message between nodes (default by rate: "
                    + ", ".join(f"{a * 1e6:g} us up to {b / 1e9:g} Gbit/s" for b, a in DEFAULT_LATENCY[:-1])
                    + f", {DEFAULT_LATENCY[-1][1] * 1e6:g} us above)")
    ap.add_argument("--measure-link", action="store_true",
                    help="measure alpha and bandwidth between ranks 0 and 1 (launch with mpirun -np 2)")
    ap.add_argument("--compute-ms", type=float, help="forward + backward per step, ms (default: measured here)")
    ap.add_argument("--batch-size", type=int, default=32, help="per rank, for the measured forward + backward")
    ap.add_argument("--device-profile", help="epyc-core (built in) or a JSON file of DeviceProfile fields "
                    "(default: measured here)")
    ap.add_argument("--save-profile", help="write the device profile used to this JSON file")
    ap.add_argument("--transport-gbs", type=float, help="CPU network stack speed, GB/s sent+received per core "
                    "(TCP); default: none (the NIC moves the bytes: RDMA, NCCL)")
    ap.add_argument("--cores", type=int, help="cores per node the ranks share (default: one per rank)")
    ap.add_argument("--allreduce", default="ring", choices=["ring", "halving-doubling"],
                    help="stock Horovod's allreduce algorithm: ring (NCCL, Horovod's docs; latency 2(M-1)·alpha) or "
                    "halving-doubling (Open MPI's for large messages; 2·log2(M)·alpha)")
    ap.add_argument("--overlap", action="store_true",
                    help="our methods exchange during backward (DistributedOptimizer(overlap=True)); stock Horovod "
                    "always does")
    ap.add_argument("--backward-share", type=float, default=2 / 3,
                    help="the backward pass's share of the forward + backward (what an overlapped exchange hides "
                    "behind; default 2/3)")
    ap.add_argument("--methods", nargs="+", default=list(model.METHODS), choices=model.METHODS)
    ap.add_argument("--plot", help="write the plot of predicted step time against ranks to this file")
    return ap


def validate(args, ap) -> List[float]:
    try:
        links = [parse_rate(r) for r in args.link.split(",") if r.strip()]
    except ValueError as exc:
        ap.error(str(exc))
    if not links:
        ap.error("--link: give at least one rate, e.g. 10gbit")
    for name, value, low in (("--ranks-per-node", args.ranks_per_node, 1), ("--tensors", args.tensors, 1),
                             ("--params", args.params, 1), ("--compute-ms", args.compute_ms, 0),
                             ("--latency-us", args.latency_us, 0), ("--cores", args.cores, 1)):
        if value is not None and value < low:
            ap.error(f"{name} must be at least {low}, got {value}")
    if not 0 <= args.backward_share <= 1:
        ap.error(f"--backward-share must lie in [0, 1], got {args.backward_share}")
    bad = [m for m in args.ranks if m < 1 or m % args.ranks_per_node]
    if bad:
        ap.error(f"--ranks {bad}: every rank count must be a positive multiple of --ranks-per-node "
                 f"{args.ranks_per_node}")
    if args.params is not None and args.compute_ms is None:
        ap.error("--params needs --compute-ms (there is no model to time)")
    return links


def launched_rank() -> Optional[int]:
    """This process's rank where an MPI launcher started it (mpi4py then initialised), else None."""
    if not any(k in os.environ for k in LAUNCHED_ENVS):
        return None
    from mpi4py import MPI
    return MPI.COMM_WORLD.rank


def say(text: str) -> None:
    print(text, flush=True)


def model_inputs(args):
    """(tensor sizes, compute seconds, how the compute was found)."""
    if args.params is not None:
        share, rest = divmod(args.params, args.tensors)
        sizes = [share + (i < rest) for i in range(args.tensors)]
        return sizes, args.compute_ms / 1e3, "given"
    from . import nets
    module, shape = nets.build(args.model)
    sizes = nets.tensor_sizes(module)
    if args.compute_ms is not None:
        return sizes, args.compute_ms / 1e3, "given"
    from .calibrate import measure_compute
    say(f"measuring {args.model}'s forward + backward here (batch {args.batch_size}, timed on 4, one thread)...")
    seconds = measure_compute(module, shape, args.batch_size)
    return sizes, seconds, f"measured here: batch {args.batch_size}, timed on min(batch, 4) and scaled"


def device_profile(args, sizes) -> DeviceProfile:
    if args.device_profile:
        dev = load_profile(args.device_profile)
    else:
        from .calibrate import measure_device
        say(f"measuring the optimizer's passes here ({min(sum(sizes), 25_000_000):,} parameters, one thread)...")
        dev = measure_device(sizes)
    changes = {}
    if args.transport_gbs is not None:
        changes["transport_gbs"] = args.transport_gbs
    changes["cores"] = args.cores if args.cores is not None else args.ranks_per_node
    dev = replace(dev, **changes)
    if args.save_profile:
        with open(args.save_profile, "w") as f:
            json.dump(dev.to_dict(), f, indent=1)
    return dev


def main(argv: Optional[List[str]] = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    links = validate(args, ap)
    rank = launched_rank()
    measured_link = None
    if args.measure_link:
        from mpi4py import MPI
        if rank is None or MPI.COMM_WORLD.Get_size() < 2:
            ap.error("--measure-link needs two ranks: mpirun -np 2 python -m hvd_distef.plan --measure-link ...")
        from .pingpong import measure_link
        measured_link = measure_link(MPI.COMM_WORLD)
    if rank:
        return 0
    try:
        sizes, compute_s, compute_how = model_inputs(args)
        dev = device_profile(args, sizes)
    except ValueError as exc:
        ap.error(str(exc))
    command = shlex.join(["python", "-m", "hvd_distef.plan", *(sys.argv[1:] if argv is None else argv)])
    name = args.model if args.params is None else f"{args.params:,} parameters"
    say(f"command: {command}")
    say(f"model: {name}, d = {sum(sizes):,} parameters in {len(sizes)} tensors; forward + backward "
        f"{1e3 * compute_s:.1f} ms ({compute_how})")
    say(f"device: {dev.name}: " + ", ".join(f"{k} {v:g}" for k, v in dev.to_dict().items()
                                                 if isinstance(v, (int, float))))
    if args.transport_gbs is None:
        say("transport: the NIC moves the bytes (no CPU cost per byte; --transport-gbs for TCP)")
    if measured_link:
        say("link: measured between ranks 0 and 1 (it replaces --link and --latency-us; place the two ranks on "
            "two nodes to measure the network, not a host's shared memory)")
    series = {}
    for bw in ([measured_link.bandwidth_bytes_s] if measured_link else links):
        alpha = (measured_link.alpha_s if measured_link else
                 args.latency_us * 1e-6 if args.latency_us is not None else default_latency(bw))
        label = f"{8 * bw / 1e9:g} Gbit/s"
        say(f"\n{label} links, latency {alpha * 1e6:g} us, {args.ranks_per_node} ranks per node "
            f"({'measured' if measured_link else 'given'}); times in ms")
        series[label] = {m: [] for m in args.methods}
        for ranks in args.ranks:
            setup = model.Setup(numel=sum(sizes), blocks=len(sizes), ranks=ranks, local=args.ranks_per_node,
                                alpha=alpha, bandwidth=bw, device=dev, compute_s=compute_s,
                                allreduce=args.allreduce, overlap=args.overlap,
                                backward_share=args.backward_share)
            predictions = model.table(setup, args.methods)
            for b in predictions:
                series[label][b.method].append((ranks, b.total))
            say(f"\nM = {ranks} ({ranks // args.ranks_per_node} nodes)\n"
                + report.text_table(report.HEAD, report.rows(predictions)))
            if setup.nodes == 1:
                say(f"M={ranks}: one node, no network link crossed: no crossover bandwidth")
                continue
            for stock in (m for m in model.STOCK if m in args.methods):
                compressed = [m for m in model.COMPRESSED if m in args.methods]
                if compressed:
                    wins_low = model.pays(replace(setup, bandwidth=1e6 / 8), stock, compressed)  # at 1 Mbit/s
                    say(report.crossover_line(ranks, stock, model.crossover(setup, stock, compressed), wins_low))
    say("\ncolumns: compute = forward + backward; cpu = the optimizer's passes (compression, server step, "
        "update); link MB = bytes on the busiest node link, busier way; wire = those bytes over the bandwidth; "
        "stack = the CPU's network stack for them (overlaps wire: the larger counts); latency = messages x alpha; "
        "hidden = cpu and communication hidden behind backward (stock Horovod always; ours with --overlap)")
    if args.plot:
        report.plot(series, command, args.plot)
        say(f"plot: {args.plot}")
    return 0
