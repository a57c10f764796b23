"""The hot loops in use, with the same signatures and results whichever runs them:

- CPU tensors: the compiled ``cpp_ops`` extension when it is built;
- CUDA tensors: the fused Triton kernels (``_triton_kernels``: the blocksign steps, decompression,
  momentum and update) when Triton is installed, imported on the first CUDA call;
- everything else (and whatever those do not cover: signum's vote): the plain PyTorch path
  (``_torch_kernels``), which is also the reference the others are tested against.

Set HVD_DISTEF_FORCE_TORCH=1 to use the torch path everywhere. Where the extension did not build
(and the torch path was not asked for), the first CPU kernel call says so once, from rank 0: why, what
it costs, and the fix (``MISSING_WARNING``).
"""
from __future__ import annotations

import functools
import os
import sys
import warnings
from typing import Optional

import torch

from . import _torch_kernels as torch_path
from ._torch_kernels import unpack_signs  # noqa: F401  (no compiled twin)
from .kernel_args import Descent, Feedback, Grads, Momentum, Pieces, Segments  # noqa: F401  (the kernels' arguments)

FORCE_TORCH_ENV = "HVD_DISTEF_FORCE_TORCH"
#: where a launcher puts this process's rank in MPI's world (Open MPI, MPICH/Intel MPI, PMIx)
RANK_ENVS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
MISSING_WARNING = (
    "hvd_distef: the compiled kernels (cpp_ops) did not load ({reason}), so CPU tensors run the pure-PyTorch "
    "path, whose worker step measured tens of times slower than the compiled one (51x at d = 2.5e7; "
    "benchmarks/kernels.py measures it). Build them with a C++ compiler and torch installed: `make install`, "
    "or `pip install --no-build-isolation -e .`; or set {env}=1 to use the torch path without this warning.")


def _forced_torch() -> bool:
    return os.environ.get(FORCE_TORCH_ENV, "") not in ("", "0")


def _load_compiled():
    """(the extension, None), or (None, why it did not load: None when the torch path was asked for)."""
    if _forced_torch():
        return None, None
    try:
        from . import _cpp_ops  # built by setup.py from cpp_ops/
    except ImportError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return _cpp_ops, None


compiled, import_error = _load_compiled()


def _world_rank() -> Optional[int]:
    """This process's rank in MPI's world, without starting MPI: mpi4py's where MPI runs, else the
    launcher's (``RANK_ENVS``), else None (no launcher: a single process)."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        return mpi.COMM_WORLD.Get_rank()
    for name in RANK_ENVS:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return None


@functools.lru_cache(maxsize=None)
def _cpu_fallback():
    """The torch path for CPU tensors where the extension did not load; the first call warns (rank 0)."""
    if import_error is not None and _world_rank() in (None, 0):
        warnings.warn(MISSING_WARNING.format(reason=import_error, env=FORCE_TORCH_ENV), RuntimeWarning)
    return torch_path


@functools.lru_cache(maxsize=None)
def gpu_path():
    """The kernels for CUDA tensors: ``_triton_kernels`` where Triton imports, else the torch path."""
    if _forced_torch():
        return torch_path
    try:
        from . import _triton_kernels
    except ImportError:
        return torch_path
    return _triton_kernels


def _pick(t: torch.Tensor):
    if t.device.type == "cpu":
        return compiled if compiled is not None else _cpu_fallback()
    return gpu_path() if t.device.type == "cuda" else torch_path


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


def _compiled_or_torch(t: torch.Tensor):
    """Kernels without a Triton twin (signum's, ``descend_blocksign_``): cpp_ops on the CPU, else the torch path."""
    if t.device.type != "cpu":
        return torch_path
    return compiled if compiled is not None else _cpu_fallback()


def pack_signs(x):
    return _compiled_or_torch(x).pack_signs(x)


def signum_momentum(g, momentum, momentum_out, segments):
    return _compiled_or_torch(g).signum_momentum(g, momentum, momentum_out, list(segments))


def majority_vote(rows, numel):
    return _compiled_or_torch(rows).majority_vote(rows, numel)


def unpack_vote(vote, numel, out=None):
    return _compiled_or_torch(vote).unpack_vote(vote, numel, out=out)


def _grads(grads: Grads) -> Grads:
    return Grads(list(grads.grads), [int(n) for n in grads.sizes],
                 None if grads.inv_scale is None else float(grads.inv_scale))


def _momentum(momentum: Momentum) -> Momentum:
    return momentum._replace(mus=[float(m) for m in momentum.mus], nesterovs=[bool(v) for v in momentum.nesterovs])


def gather_momentum(grads: Grads, d, momentum: Momentum) -> bool:
    """The worker's momentum of SPEC §1 (``_torch_kernels.gather_momentum``)."""
    # the compiled kernel reads each gradient in place: they must be contiguous
    path = _pick(d) if all(g.is_contiguous() for g in grads.grads) else torch_path
    return path.gather_momentum(_grads(grads), d, _momentum(momentum))


def worker_blocksign_feedback(grads: Grads, momentum: Momentum, feedback: Feedback):
    """The worker's momentum and error step in one pass (``_torch_kernels.worker_blocksign_feedback``):
    compiled on the CPU for contiguous gradients; elsewhere the torch path (the optimizer runs the
    two steps apart there)."""
    path = _compiled_or_torch(feedback.error) if all(g.is_contiguous() for g in grads.grads) else torch_path
    return path.worker_blocksign_feedback(_grads(grads), _momentum(momentum), feedback._replace(
        start=int(feedback.start), block_sizes=list(feedback.block_sizes), segments=list(feedback.segments)))


def descend_(params, delta, decay_buffer, descent: Descent) -> None:
    """The update of SPEC §1 for one param group (``_torch_kernels.descend_``)."""
    # the compiled and Triton kernels read each parameter in place: they must be contiguous
    path = _pick(delta) if all(p.is_contiguous() for p in params) else torch_path
    path.descend_(list(params), delta, decay_buffer, descent)


def descend_blocksign_(params, pieces: Pieces, decay_buffer, descent: Descent) -> None:
    """``descend_`` with Δ̃ as blocksign payloads (``_torch_kernels.descend_blocksign_``): compiled on
    the CPU; elsewhere the torch path (the optimizer decompresses Δ̃ itself there)."""
    path = _compiled_or_torch(params[0]) if params and all(p.is_contiguous() for p in params) else torch_path
    path.descend_blocksign_(list(params), Pieces([int(s) for s in pieces.starts], list(pieces.scales),
                                                 list(pieces.bits), [[int(n) for n in b] for b in pieces.block_sizes]),
                            decay_buffer, descent)


def compensate(d, error, segments, out=None):
    """p = d + (η_{t-1}/η_t)·e (``_torch_kernels.compensate``) into ``out`` (may be d) or a new vector:
    one pass and no temporary with the compiled kernel; the torch path elsewhere."""
    path = _compiled_or_torch(d) if out is None or out.is_contiguous() else torch_path
    return path.compensate(d, error, list(segments), out)


def half_feedback(sources, error, segments, max_value, out=None):
    """The error step of ``fp16`` (``_torch_kernels.half_feedback``): one pass with the compiled kernel."""
    return _compiled_or_torch(error).half_feedback(list(sources), error, list(segments), float(max_value), out)
