"""A whole `opt.step()` of `ps` + blocksign on one rank (no network) against a stock torch SGD step
and against the worker half of GRACE-style EF-sign code (issue 12, item 2).

Model: about 26M float32 parameters in 20 tensors with sizes like ResNet-50's larger layers,
gradients already computed. The three run in turn within each repeat, in one process, so the
noise of a shared machine falls on all alike; the ratios of the medians are the result, and the
stock step's own spread is printed (it is bimodal on these machines). Ours is also given without
its server step (the exchange seconds of ``comm_stats``): the step of a rank that is not the
server under ``ps`` (under ``sharded`` each rank runs 1/M of the server step). With the compiled
kernels the worker's side is also timed alone, in turn: its one pass from the gradients
(``worker_blocksign_feedback``, what the step runs) against the two passes it replaced
(``gather_momentum``, then ``blocksign_feedback`` on the d written out). The CPU model is printed
and written with every result: the figures of one machine do not hold on another.

    .venv/bin/python benchmarks/step.py [--threads 1 2] [--repeats R]     # -> benchmarks/results/step.json
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import hvd_distef
from hvd_distef import _kernels
from common import cpu_model, write_results
from kernels import grace_style

SIZES = [2359296] * 6 + [2097152, 2048000, 1048576] * 2 + [589824, 524288, 262144, 131072, 65536, 36864, 16384, 9408]


def spread(times):
    return {"min_s": min(times), "median_s": statistics.median(times), "max_s": max(times)}


def worker_passes(grads, repeats: int) -> dict:
    """Medians (s) of the worker's side on these gradients: one pass against two, in turn."""
    cpp, n = _kernels.compiled, sum(SIZES)
    m, m_next, e, e_next, d = (torch.randn(n) * 0.01 for _ in range(5))
    segments = [(0, n, 1.0)]
    prev = cpp.blocksign_compress(torch.randn(n), SIZES)  # the previous step's payload, settled by each
    g = _kernels.Grads(grads, SIZES)
    momentum = _kernels.Momentum(m, m_next, [0.9] * len(SIZES), [True] * len(SIZES))
    fns = {"one_pass": lambda: cpp.worker_blocksign_feedback(
               g, momentum, _kernels.Feedback(e, e_next, 0, SIZES, segments, *prev)),
           "two_passes": lambda: (cpp.gather_momentum(g, d, momentum),
                                  cpp.blocksign_feedback(d, e, SIZES, segments, *prev))}
    times = {name: [] for name in fns}
    for repeat in range(repeats + 2):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if repeat >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(threads: int, repeats: int) -> dict:
    """Stock SGD, ours and GRACE's worker half in turn at ``threads`` torch threads (medians, spreads)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n) * 0.01) for n in SIZES]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    hyper = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    stock = torch.optim.SGD(params, **hyper)
    ours = hvd_distef.DistributedOptimizer(torch.optim.SGD(params, **hyper), compression="blocksign", topology="ps")
    grads = torch.cat([p.grad.reshape(-1) for p in params])
    residual = torch.zeros_like(grads)
    fns = {"stock": stock.step, "ours": ours.step, "grace_worker": lambda: grace_style(grads, residual, SIZES)}
    times = {name: [] for name in fns}
    worker = []  # ours without its server step: the step of a rank that is not the server
    for repeat in range(repeats + 2):
        for name, fn in fns.items():
            server_before = ours.comm_stats()["exchange_time_s"]
            start = time.perf_counter()
            fn()
            if repeat >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - start)
                if name == "ours":
                    worker.append(times[name][-1] - (ours.comm_stats()["exchange_time_s"] - server_before))
    med = {name: statistics.median(t) for name, t in times.items()}
    med["worker"] = statistics.median(worker)
    result = {"params": sum(SIZES), "tensors": len(SIZES), "threads": threads,
              "compiled_kernels": _kernels.compiled is not None, "repeats": repeats,
              "stock_sgd_step": spread(times["stock"]), "ps_blocksign_step": spread(times["ours"]),
              "grace_worker_half": spread(times["grace_worker"]), "ps_worker_step": spread(worker),
              "ratio_to_stock": med["ours"] / med["stock"], "ratio_to_grace_worker": med["ours"] / med["grace_worker"],
              "worker_ratio_to_stock": med["worker"] / med["stock"]}
    s = result["stock_sgd_step"]
    print(f"{result['params'] / 1e6:.1f}M params in {len(SIZES)} tensors, {threads} threads, "
          f"compiled kernels: {result['compiled_kernels']}")
    print(f"stock torch.optim.SGD step     {1000 * s['median_s']:8.1f} ms  (min {1000 * s['min_s']:.1f}, "
          f"max {1000 * s['max_s']:.1f})")
    print(f"ps + blocksign step (whole)    {1000 * med['ours']:8.1f} ms  {result['ratio_to_stock']:.2f}x stock")
    print(f"  without its server step      {1000 * med['worker']:8.1f} ms  {result['worker_ratio_to_stock']:.2f}x stock "
          f"(a rank that is not the server)")
    print(f"GRACE-style EF-sign, worker    {1000 * med['grace_worker']:8.1f} ms  ours is "
          f"{result['ratio_to_grace_worker']:.2f}x of it")
    if result["compiled_kernels"]:
        passes = worker_passes([p.grad for p in params], repeats)
        result.update(worker_one_pass_s=passes["one_pass"], worker_two_passes_s=passes["two_passes"])
        print(f"worker side, one pass          {1000 * passes['one_pass']:8.1f} ms  "
              f"{passes['one_pass'] / passes['two_passes']:.2f}x its two passes "
              f"({1000 * passes['two_passes']:.1f} ms)", flush=True)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    print(cpu_model())
    rows = [measure(threads, args.repeats) for threads in args.threads]
    print(f"wrote {write_results('step', rows)}")


if __name__ == "__main__":
    main()
