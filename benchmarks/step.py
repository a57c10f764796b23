"""A whole `opt.step()` of `ps` + blocksign on one rank (no network) against a stock torch SGD step.

Model: about 27M float32 parameters in 20 tensors with sizes like ResNet-50's larger layers,
gradients already computed. Both optimizers step the same model in the same process; the ratio
of the medians is the result.

    .venv/bin/python benchmarks/step.py [--threads N] [--repeats R]
"""
from __future__ import annotations

import argparse

import torch

import hvd_distef
from hvd_distef import _kernels
from common import median_times, write_json

SIZES = [2359296] * 6 + [2097152, 2048000, 1048576] * 2 + [589824, 524288, 262144, 131072, 65536, 36864, 16384, 9408]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = [torch.nn.Parameter(torch.randn(n) * 0.01) for n in SIZES]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    hyper = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    stock = torch.optim.SGD(params, **hyper)
    ours = hvd_distef.DistributedOptimizer(torch.optim.SGD(params, **hyper), compression="blocksign", topology="ps")
    times = median_times({"stock": stock.step, "ours": ours.step}, args.repeats)
    t_stock, t_ours = times["stock"], times["ours"]
    result = {"params": sum(SIZES), "tensors": len(SIZES), "threads": args.threads,
              "compiled_kernels": _kernels.compiled is not None,
              "stock_sgd_step_s": t_stock, "ps_blocksign_step_s": t_ours, "ratio": t_ours / t_stock}
    print(f"{result['params'] / 1e6:.1f}M params in {len(SIZES)} tensors, {args.threads} threads, "
          f"compiled kernels: {result['compiled_kernels']}")
    print(f"stock torch.optim.SGD step  {1000 * t_stock:8.1f} ms")
    print(f"ps + blocksign step         {1000 * t_ours:8.1f} ms   ratio {result['ratio']:.2f}x")
    path = write_json(f"step_threads{args.threads}{'' if result['compiled_kernels'] else '_torch'}.json", result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
