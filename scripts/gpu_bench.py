"""GPU step benchmark (issue 14): one ``ps`` + blocksign ``opt.step()`` on one rank against a stock
``torch.optim.SGD`` step (foreach and fused), and the fused worker kernel's bandwidth against a
device-to-device copy. Writes JSON; without a CUDA GPU it writes what was skipped and why.

    python scripts/gpu_bench.py --out results.json [--repeats 20]

Parameters: 26.2M float32 in 20 tensors with ResNet-50's larger layer sizes, gradients present
(no network: one rank, so the exchange is rank 0's server step and the decompression of Δ̃).
Times are medians of CUDA-synchronised wall clocks (a step waits for its kernels). Bytes for the
kernel: the worker step reads d and e and writes e (12 B per element, the bits are 1/32 of that);
the copy reads and writes 4 B each (8 B per element). Targets: the worker kernel at d = 2.5e7
at least 50% of the copy's bandwidth; a whole step at most 2x a stock fused SGD step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

SIZES = [2359296] * 6 + [2097152, 2048000, 1048576] * 2 + [589824, 524288, 262144, 131072, 65536, 36864, 16384, 9408]
HYPER = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
KERNEL_NUMEL = 25_000_000


def median_s(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def model():
    params = [torch.nn.Parameter(torch.randn(n, device="cuda") * 0.01) for n in SIZES]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def step_benchmark(repeats: int) -> dict:
    import hvd_distef
    params = model()
    stock = {kind: torch.optim.SGD(params, **HYPER, **{kind: True}) for kind in ("foreach", "fused")}
    ours = hvd_distef.DistributedOptimizer(torch.optim.SGD(params, **HYPER), compression="blocksign", topology="ps")
    t = {f"stock_sgd_{kind}_step_s": median_s(opt.step, repeats) for kind, opt in stock.items()}
    t["ps_blocksign_step_s"] = median_s(ours.step, repeats)
    stats = ours.comm_stats()
    return dict(t, params=sum(SIZES), tensors=len(SIZES),
                ratio_to_fused=t["ps_blocksign_step_s"] / t["stock_sgd_fused_step_s"],
                ratio_to_foreach=t["ps_blocksign_step_s"] / t["stock_sgd_foreach_step_s"],
                target_ratio_to_fused=2.0, compress_time_s=stats["compress_time_s"] / stats["steps"],
                exchange_time_s=stats["exchange_time_s"] / stats["steps"])


def kernel_benchmark(repeats: int) -> dict:
    from hvd_distef import _kernels, _torch_kernels
    n = KERNEL_NUMEL
    blocks, left = [], n
    for size in SIZES * 2:  # ResNet-50's sizes, cut to n
        if left <= 0:
            break
        blocks.append(min(size, left))
        left -= blocks[-1]
    if left > 0:
        blocks.append(left)
    segments = [(0, n, 1.0)]
    d, e = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    src, dst = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
    result = {"numel": n, "blocks": len(blocks), "path": _kernels.gpu_path().__name__}
    for name, kernels in (("fused", _kernels), ("torch_path", _torch_kernels)):
        prev = kernels.blocksign_feedback(d, e, blocks, segments)
        seconds = median_s(lambda: kernels.blocksign_feedback(d, e, blocks, segments, *prev), repeats)
        result[f"{name}_worker_step_s"] = seconds
        result[f"{name}_worker_GBps"] = 12 * n / seconds / 1e9
    copy_s = median_s(lambda: dst.copy_(src), repeats)
    result.update(copy_s=copy_s, copy_GBps=8 * n / copy_s / 1e9)
    result["fused_share_of_copy"] = result["fused_worker_GBps"] / result["copy_GBps"]
    result["target_share_of_copy"] = 0.5
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    result: dict = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        result["skipped"] = "no CUDA GPU (torch.cuda.is_available() is False): nothing was measured"
        print(f"gpu_bench: {result['skipped']}")
    else:
        result["device"] = torch.cuda.get_device_name()
        for name, bench in (("kernel", kernel_benchmark), ("step", step_benchmark)):
            try:
                result[name] = bench(args.repeats)
            except Exception as exc:  # noqa: BLE001 - one benchmark's failure is reported, the other still runs
                result[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"gpu_bench {name}: {json.dumps(result[name])}")
            torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    failed = [k for k in ("kernel", "step") if isinstance(result.get(k), dict) and "error" in result[k]]
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
