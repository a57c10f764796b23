"""The hot loops in use: the compiled ``cpp_ops`` extension when it is built and the tensors are on
the CPU, else the plain PyTorch path (``_torch_kernels``), with the same signatures and results.

Set HVD_DISTEF_FORCE_TORCH=1 to use the torch path everywhere.
"""
from __future__ import annotations

import os

import torch

from . import _torch_kernels as torch_path
from ._torch_kernels import Segments, compensate, unpack_signs  # noqa: F401  (no compiled twin)

FORCE_TORCH_ENV = "HVD_DISTEF_FORCE_TORCH"


def _load_compiled():
    if os.environ.get(FORCE_TORCH_ENV, "") not in ("", "0"):
        return None
    try:
        from . import _cpp_ops  # built by setup.py from cpp_ops/
    except ImportError:
        return None
    return _cpp_ops


compiled = _load_compiled()


def _pick(t: torch.Tensor):
    return compiled if compiled is not None and t.device.type == "cpu" else torch_path


def blocksign_compress(x, block_sizes):
    return _pick(x).blocksign_compress(x, list(block_sizes))


def blocksign_decompress(scales, bits, block_sizes, numel, out=None):
    return _pick(scales).blocksign_decompress(scales, bits, list(block_sizes), numel, out=out)


def blocksign_feedback(d, error, block_sizes, segments, prev_scales=None, prev_bits=None):
    return _pick(d).blocksign_feedback(d, error, list(block_sizes), list(segments), prev_scales, prev_bits)


def blocksign_decompress_mean(scales, bits, block_sizes, numel, out=None):
    return _pick(scales[0]).blocksign_decompress_mean(list(scales), list(bits), list(block_sizes), numel, out=out)


def blocksign_server_feedback(scales, bits, error, block_sizes, segments, prev_scales=None, prev_bits=None):
    return _pick(error).blocksign_server_feedback(list(scales), list(bits), error, list(block_sizes),
                                                  list(segments), prev_scales, prev_bits)


def pack_signs(x):
    return _pick(x).pack_signs(x)


def majority_vote(rows, numel):
    return _pick(rows).majority_vote(rows, numel)


def unpack_vote(vote, numel, out=None):
    return _pick(vote).unpack_vote(vote, numel, out=out)


def momentum_(grad, momentum, mu, nesterov):
    _pick(grad).momentum_(grad, momentum, mu, nesterov)


def descend_(params, delta, decay_buffer, lr, mu, weight_decay, nesterov):
    # the compiled kernel reads each parameter in place: they must be contiguous
    path = _pick(delta) if all(p.is_contiguous() for p in params) else torch_path
    path.descend_(list(params), delta, decay_buffer, lr, mu, weight_decay, nesterov)
