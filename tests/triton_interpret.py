"""Runs the Triton kernels through Triton's interpreter on CPU tensors and saves what they return.

    python tests/triton_interpret.py OUT.pt

TRITON_INTERPRET must be set before Triton is imported, so this runs in a process of its own
(``tests/test_triton_kernels.py`` starts it and compares the results with the torch path). The
inputs (``cases``, ``steps``) are built here and rebuilt by the test from the same seeds.
"""
import os
import sys

import torch

#: small tiles: blocks span several tasks and share sign words at their boundaries
TILE = 64


def rand(n, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def cases():
    """name -> (vector, block sizes, tile), small enough for the interpreter."""
    return {
        "one": (rand(1, 1), [1], TILE),
        "seven": (rand(7, 2), [7], TILE),
        "eight_in_two_blocks": (rand(8, 3), [3, 5], TILE),
        "negative_zero": (torch.tensor([-0.0, 0.0, -0.0, 1.0, -1.0, -0.0, 0.0, -0.0, -0.0]), [4, 5], TILE),
        "denormals": (torch.tensor([1e-45, -1e-45, 3e-42, -2e-40] * 5), [7, 13], TILE),
        "blocks_of_one": (rand(77, 4), [1] * 77, TILE),
        "odd_blocks_across_tiles": (rand(1000, 5), [130, 3, 500, 33, 334], TILE),
        "many_small_blocks": (rand(600, 6), [5, 11, 2, 40, 7, 1, 33, 64, 64, 9, 200, 164], TILE),
        "production_tile": (rand(9000, 7), [4000, 97, 4903], 4096),
    }


def segments(n):
    """Two param groups with their own η_{t-1}/η_t and an idle stretch (ratio 0) between them."""
    return [(0, n // 3, 0.5), (n // 3, n // 2, 0.0), (n // 2, n, 10.0)]


def steps(n, seed):
    """Three worker directions and a starting error."""
    return [rand(n, seed + t) for t in range(3)], rand(n, seed + 9)


def server_inputs(n, blocks, seed):
    """Three workers' payloads (from the torch path) and a starting server error."""
    from hvd_distef import _torch_kernels as ref
    payloads = [ref.blocksign_compress(rand(n, seed + m), blocks) for m in range(3)]
    return [p[0] for p in payloads], [p[1] for p in payloads], rand(n, seed + 7)


PARAM_SIZES = [5, 0, 300, 17, 64]


def update_inputs():
    """Parameters (one empty), Δ̃, the weight-decay buffer, gradient and momentum of the update passes."""
    n = sum(PARAM_SIZES)
    return [rand(k, 40 + i) for i, k in enumerate(PARAM_SIZES)], rand(n, 50), rand(n, 51), rand(n, 52), rand(n, 53)


UPDATES = {"nesterov_decay": (0.1, 0.9, 5e-4, True), "plain_decay": (0.1, 0.9, 5e-4, False),
           "no_decay": (0.05, 0.9, 0.0, True)}


def run_worker_steps(kernels, d_list, error, blocks, segs, **tile):
    """Three deferred worker steps; returns each step's payload and the buffer (p of the last step)."""
    prev, sent = (None, None), []
    for d in d_list:
        prev = kernels.blocksign_feedback(d, error, blocks, segs, *prev, **tile)
        sent.append(prev)
    return sent, error


def main(out_path):
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
    from hvd_distef import _triton_kernels as tk
    from hvd_distef.kernel_args import Descent, Grads, Momentum
    out = {}
    for name, (x, blocks, tile) in cases().items():
        n = x.numel()
        out[name, "compress"] = tk.blocksign_compress(x, blocks, tile=tile)
        d_list, error = steps(n, 20)
        out[name, "worker"] = run_worker_steps(tk, d_list, error, blocks, segments(n), tile=tile)
        scales, bits, e = server_inputs(n, blocks, 30)
        prev = out[name, "worker"][0][-1]
        out[name, "server"] = (tk.blocksign_server_feedback(scales, bits, e, blocks, segments(n), *prev, tile=tile), e)
        out[name, "decompress"] = tk.blocksign_decompress(scales[0], bits[0], blocks, n, tile=tile)
        out[name, "decompress_mean"] = tk.blocksign_decompress_mean(scales, bits, blocks, n, tile=tile)
    for name, (lr, mu, wd, nesterov) in UPDATES.items():
        params, delta, w, grad, momentum = update_inputs()
        tk.descend_(params, delta, w, Descent(lr, mu, wd, nesterov))
        d, momentum_out = torch.empty_like(grad), torch.empty_like(momentum)
        finite = tk.gather_momentum(Grads([grad], [grad.numel()]), d, Momentum(momentum, momentum_out, [mu], [nesterov]))
        out[name, "update"] = (params, w, d, momentum_out, finite)
    bad = rand(300, 60)
    bad[170] = float("inf")
    try:
        tk.blocksign_compress(bad, [100, 100, 100], tile=TILE)
        out["nonfinite"] = "no error"
    except ValueError as exc:
        out["nonfinite"] = str(exc)
    torch.save(out, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
