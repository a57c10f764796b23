"""The fused blockwise-sign worker step against the torch path, a GRACE-style unfused torch
baseline and a plain memory copy of the same buffer, measured in the same run.

For d from 1e5 to 1e8 floats, with per-tensor blocks drawn from ResNet-50's layer sizes, at 1
thread and at all cores. The fused step must read d and e and write e and the bits: ~12 bytes per
element, so its bandwidth limit is 1.5x the time of a copy (8 bytes per element).

    .venv/bin/python benchmarks/kernels.py [--sizes 1e5 1e6 ...] [--repeats 5]

Writes benchmarks/results/kernels.json (``common.write_results``); benchmarks/record.py makes
BENCHMARKS.md's table and plot from it.
"""
from __future__ import annotations

import argparse

import torch

from common import layer_sizes, median_times, write_results
from hvd_distef import _kernels
from hvd_distef import _torch_kernels as torch_path


def grace_style(x: torch.Tensor, residual: torch.Tensor, block_sizes) -> list:
    """What GRACE-style EF-sign code does: per tensor, several unfused passes, one byte per sign."""
    out = []
    for t, r in zip(x.split(block_sizes), residual.split(block_sizes)):
        t = t + r
        signs = (t >= 0).to(torch.uint8)
        mean = t.abs().mean()
        decompressed = (signs.to(torch.float32) * 2 - 1) * mean
        r.copy_(t - decompressed)
        out.append((signs, mean))
    return out


def steady(kernel, x, error, blocks, segments):
    """A worker step as training runs it: each call also settles the previous call's payload."""
    previous = [(None, None)]

    def step():
        previous[0] = kernel(x, error, blocks, segments, *previous[0])
    return step


def measure(d: int, threads: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    blocks = layer_sizes(d)
    segments = [(0, d, 1.0)]
    x = torch.randn(d)
    e_fused, e_torch, e_grace = (torch.randn(d) * 0.01 for _ in range(3))
    dst = torch.empty(d)
    fns = {
        "copy": lambda: dst.copy_(x),
        "fused": steady(_kernels.compiled.blocksign_feedback, x, e_fused, blocks, segments),
        "torch": steady(torch_path.blocksign_feedback, x, e_torch, blocks, segments),
        "grace": lambda: grace_style(x, e_grace, blocks),
    }
    t = median_times(fns, repeats=repeats, warmup=1)
    limit = 1.5 * t["copy"]  # 12 bytes per element at the copy's 8-byte bandwidth
    return {"d": d, "blocks": len(blocks), "threads": threads, **{f"{k}_s": v for k, v in t.items()},
            "copy_gbs": 8 * d / t["copy"] / 1e9, "fused_gbs": 12 * d / t["fused"] / 1e9,
            "fused_fraction_of_limit": limit / t["fused"], "speedup_vs_grace": t["grace"] / t["fused"],
            "speedup_vs_torch": t["torch"] / t["fused"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6, 1e7, 2.5e7, 1e8])
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({1, torch.get_num_threads()}))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if _kernels.compiled is None:
        raise SystemExit("cpp_ops is not built (run `make install`), or HVD_DISTEF_FORCE_TORCH is set")
    rows = []
    print(f"{'d':>11} {'thr':>3} {'copy GB/s':>9} {'fused GB/s':>10} {'of limit':>8} {'vs torch':>8} {'vs GRACE':>8}")
    for threads in args.threads:
        for d in args.sizes:
            r = measure(int(d), threads, args.repeats if d < 5e7 else max(3, args.repeats // 2))
            rows.append(r)
            print(f"{r['d']:>11,} {threads:>3} {r['copy_gbs']:>9.2f} {r['fused_gbs']:>10.2f} "
                  f"{100 * r['fused_fraction_of_limit']:>7.0f}% {r['speedup_vs_torch']:>7.1f}x "
                  f"{r['speedup_vs_grace']:>7.1f}x", flush=True)
    print(f"wrote {write_results('kernels', rows)}")


if __name__ == "__main__":
    main()
