"""Fused GPU kernels in Triton: the worker and server error-feedback steps of blocksign, its
decompression, and the optimizer's momentum and update passes (SPEC §1, §2).

Same signatures, bit layout and arithmetic as ``_torch_kernels`` (the reference) and
``cpp_ops/blocksign.cpp``: sign bits packed 8 per byte, element i -> bit i%8 of byte i//8, set
where x >= 0 (sign(0) = +1, also for -0.0); scale_b = ||x_b||_1 / d_b with the L1 norm summed in
float64 and rounded to float32 once; p = d + r·e with r·e rounded before the sum (every kernel is
launched with ``enable_fp_fusion=False``: no fused multiply-add); the server's mean is
((0 + v_0) + v_1 + ... + v_{M-1}) / M. Packed bits equal the reference's; scales and errors agree
to float rounding (the float64 sums run in another order) and are deterministic: no floating-point
atomics.

Work is cut into tasks: the intersections of the blocks with aligned tiles of ``TILE`` elements.
A task lies in one block, so its scale and its L1 partial are scalars; its tile is aligned to 32
elements, so its sign bits are whole 32-bit words except at block boundaries, where the two tasks
sharing a word OR their bits into it (integer atomics: exact and order-free). A second small
kernel sums each block's partials in task order. The error steps defer e <- p − C(p) to their next
call, as the compiled kernels do (see ``_torch_kernels.blocksign_feedback``).

Importing this module imports Triton; ``_kernels`` does so only for CUDA tensors, and only where
Triton is installed. With ``TRITON_INTERPRET=1`` set before Triton is imported, every kernel runs
on CPU tensors through Triton's interpreter (how the tests check them without a GPU).
"""
from __future__ import annotations

import functools
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import _torch_kernels as torch_path
from .kernel_args import Descent, Grads, Momentum, Segments

#: elements per task; tiles are aligned to it (a multiple of 32)
TILE = 4096
#: elements per program of the element-wise passes (momentum, update)
ELEMENTWISE = 2048
_LAUNCH = {"enable_fp_fusion": False}  # r·e rounds before the add, as in the torch path


class Tasks(NamedTuple):
    """The tasks of one block layout, on the device: task t covers [lo[t], hi[t]) of block block[t];
    block b's tasks are first[b] .. first[b+1]-1."""

    block: torch.Tensor   # int32 [T]
    lo: torch.Tensor      # int64 [T]
    hi: torch.Tensor      # int64 [T]
    first: torch.Tensor   # int64 [B+1]
    sizes: torch.Tensor   # int64 [B]
    first_offset: torch.Tensor  # int64 [B]: where block b starts
    count: int


@functools.lru_cache(maxsize=64)
def tasks(block_sizes: Tuple[int, ...], numel: int, device: torch.device, tile: int = TILE) -> Tasks:
    """The tasks of a layout (cached: a training run has a few layouts, used every step). Raises
    ValueError unless the block sizes are positive and sum to ``numel``."""
    sizes = torch.tensor(block_sizes, dtype=torch.int64)
    if bool((sizes <= 0).any()) or int(sizes.sum()) != numel:
        raise ValueError(f"block sizes must be positive and sum to the vector length {numel}, got "
                         f"{len(block_sizes)} blocks summing to {int(sizes.sum())}")
    stop = sizes.cumsum(0)
    start = stop - sizes
    first_tile, last_tile = start // tile, (stop - 1) // tile
    counts = last_tile - first_tile + 1
    block = torch.repeat_interleave(torch.arange(len(block_sizes)), counts)
    first = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    tile_index = first_tile[block] + torch.arange(int(first[-1])) - first[:-1][block]
    lo = torch.maximum(start[block], tile_index * tile)
    hi = torch.minimum(stop[block], (tile_index + 1) * tile)
    to = functools.partial(torch.Tensor.to, device=device)
    return Tasks(to(block.to(torch.int32)), to(lo), to(hi), to(first), to(sizes), to(start), int(first[-1]))


def _pieces(segments: Segments, numel: int, t: Tasks, device) -> Tuple[torch.Tensor, ...]:
    """The per-element ratio as pieces (start, ratio), 0 between segments, and each task's first and
    last piece index."""
    pieces, at = [], 0
    for start, stop, ratio in sorted(segments):
        if start > at:
            pieces.append((at, 0.0))
        pieces.append((start, ratio))
        at = stop
    pieces.append((at, 0.0))  # past the last segment (empty when it ends at numel)
    starts, ratios = zip(*pieces)
    starts_t = torch.tensor(starts, dtype=torch.int64).to(device)
    first = torch.searchsorted(starts_t, t.lo, right=True) - 1
    last = torch.searchsorted(starts_t, t.hi - 1, right=True) - 1
    return starts_t, torch.tensor(ratios, dtype=torch.float32).to(device), first, last


# --- device functions shared by the kernels ---------------------------------------------------------
@triton.jit
def _ratio(offs, pid, starts, ratios, piece_first, piece_last, TILE: tl.constexpr):
    """η_{t-1}/η_t of each element of the task (its segment's, 0 outside every segment)."""
    r = tl.zeros([TILE], tl.float32)
    for j in range(tl.load(piece_first + pid), tl.load(piece_last + pid) + 1):
        r = tl.where(offs >= tl.load(starts + j), tl.load(ratios + j), r)
    return r


@triton.jit
def _signed(bits_ptr, offs, mask, scale):
    """±scale per element from packed sign bits (-scale where the bit is clear)."""
    byte = tl.load(bits_ptr + offs // 8, mask=mask, other=0).to(tl.int32)
    return tl.where(((byte >> (offs % 8)) & 1) != 0, scale, -scale)


@triton.jit
def _settle_compensate(d, e_ptr, offs, mask, r, blk, prev_scales, prev_bits, HAS_PREV: tl.constexpr):
    """p = d + r·(e − C_prev) (r·e without a previous payload); p = d where r = 0 (e not read)."""
    live = mask & (r != 0.0)
    e = tl.load(e_ptr + offs, mask=live, other=0.0)
    if HAS_PREV:
        e = e - _signed(prev_bits, offs, live, tl.load(prev_scales + blk))
    t = r * e
    return tl.where(r != 0.0, d + t, d)


@triton.jit
def _finish(p, offs, mask, lo, hi, pid, tile_start, partial_ptr, words_ptr, TILE: tl.constexpr):
    """The task's L1 partial (float64) and its sign bits, as 32-bit words: stored where the task
    covers the whole word, OR-ed atomically at block boundaries (words shared with another task)."""
    tl.store(partial_ptr + pid, tl.sum(tl.where(mask, tl.abs(p), 0.0).to(tl.float64), axis=0))
    bits = (mask & (p >= 0)).to(tl.uint32)
    shifts = tl.arange(0, 32).to(tl.uint32)
    words = tl.sum(tl.reshape(bits, (TILE // 32, 32)) << shifts[None, :], axis=1)
    word_start = tile_start + tl.arange(0, TILE // 32) * 32
    whole = (word_start >= lo) & (word_start + 32 <= hi)
    shared = ~whole & (word_start < hi) & (word_start + 32 > lo)
    index = word_start // 32
    tl.store(words_ptr + index, words, mask=whole)
    tl.atomic_or(words_ptr + index, words, mask=shared)


@triton.jit
def _task(pid, task_block, task_lo, task_hi, TILE: tl.constexpr):
    blk = tl.load(task_block + pid)
    lo = tl.load(task_lo + pid)
    hi = tl.load(task_hi + pid)
    tile_start = (lo // TILE) * TILE
    offs = tile_start + tl.arange(0, TILE)
    return blk, lo, hi, tile_start, offs, (offs >= lo) & (offs < hi)


# --- kernels ------------------------------------------------------------------------------------------
@triton.jit
def _feedback_kernel(d_ptr, e_ptr, prev_scales, prev_bits, starts, ratios, piece_first, piece_last,
                     task_block, task_lo, task_hi, partial_ptr, words_ptr,
                     HAS_ERROR: tl.constexpr, HAS_PREV: tl.constexpr, TILE: tl.constexpr):
    """Worker step (HAS_ERROR) or plain compression of d: p into e, L1 partials, sign words."""
    pid = tl.program_id(0)
    blk, lo, hi, tile_start, offs, mask = _task(pid, task_block, task_lo, task_hi, TILE)
    p = tl.load(d_ptr + offs, mask=mask, other=0.0)
    if HAS_ERROR:
        r = _ratio(offs, pid, starts, ratios, piece_first, piece_last, TILE)
        p = _settle_compensate(p, e_ptr, offs, mask, r, blk, prev_scales, prev_bits, HAS_PREV)
        tl.store(e_ptr + offs, p, mask=mask)
    _finish(p, offs, mask, lo, hi, pid, tile_start, partial_ptr, words_ptr, TILE)


@triton.jit
def _mean(scales_ptr, bits_ptr, offs, mask, blk, num_blocks, num_bytes, M):
    """((0 + v_0) + v_1 + ... + v_{M-1}) / M over M stacked payloads, as the reference sums them."""
    acc = tl.zeros(offs.shape, tl.float32)
    for m in range(M):
        acc += _signed(bits_ptr + m * num_bytes, offs, mask, tl.load(scales_ptr + m * num_blocks + blk))
    return acc / M


@triton.jit
def _server_kernel(scales_ptr, bits_ptr, M, num_blocks, num_bytes, e_ptr, prev_scales, prev_bits,
                   starts, ratios, piece_first, piece_last, task_block, task_lo, task_hi, partial_ptr, words_ptr,
                   HAS_PREV: tl.constexpr, TILE: tl.constexpr):
    """Server step: p = mean of the M payloads + r·(ẽ − C_prev) into ẽ, L1 partials, sign words."""
    pid = tl.program_id(0)
    blk, lo, hi, tile_start, offs, mask = _task(pid, task_block, task_lo, task_hi, TILE)
    mean = _mean(scales_ptr, bits_ptr, offs, mask, blk, num_blocks, num_bytes, M)
    r = _ratio(offs, pid, starts, ratios, piece_first, piece_last, TILE)
    p = _settle_compensate(mean, e_ptr, offs, mask, r, blk, prev_scales, prev_bits, HAS_PREV)
    tl.store(e_ptr + offs, p, mask=mask)
    _finish(p, offs, mask, lo, hi, pid, tile_start, partial_ptr, words_ptr, TILE)


@triton.jit
def _scales_kernel(partial_ptr, first_ptr, sizes_ptr, scales_ptr):
    """scale_b = (Σ of block b's partials, in task order) / d_b, rounded to float32 once."""
    b = tl.program_id(0)
    first = tl.load(first_ptr + b)
    total = tl.load(partial_ptr + first)  # every block has a task
    for t in range(first + 1, tl.load(first_ptr + b + 1)):
        total += tl.load(partial_ptr + t)
    tl.store(scales_ptr + b, (total / tl.load(sizes_ptr + b).to(tl.float64)).to(tl.float32))


@triton.jit
def _decompress_kernel(scales_ptr, bits_ptr, M, num_blocks, num_bytes, out_ptr, task_block, task_lo, task_hi,
                       TILE: tl.constexpr):
    pid = tl.program_id(0)
    blk, lo, hi, tile_start, offs, mask = _task(pid, task_block, task_lo, task_hi, TILE)
    tl.store(out_ptr + offs, _mean(scales_ptr, bits_ptr, offs, mask, blk, num_blocks, num_bytes, M), mask=mask)


@triton.jit
def _momentum_kernel(g_ptr, m_ptr, m_out_ptr, n, mu, NESTEROV: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask)
    m = tl.load(m_ptr + offs, mask=mask) * mu + g
    tl.store(m_out_ptr + offs, m, mask=mask)
    if NESTEROV:
        g = g + m * mu
    else:
        g = m
    tl.store(g_ptr + offs, g, mask=mask)


@triton.jit
def _descend_kernel(param_ptrs, param_start, delta_ptr, w_ptr, lr, mu, wd, task_param, task_lo, task_hi,
                    HAS_DECAY: tl.constexpr, NESTEROV: tl.constexpr, TILE: tl.constexpr):
    """One task of one parameter, read in place through a table of addresses (the group's
    parameters are separate tensors): w = μ·w + λ·x;  u = (Δ̃ + μ·w) + λ·x (nesterov) or Δ̃ + w
    (without weight decay, u = Δ̃);  x = x − η·u. Offsets are in the group's flat coordinates."""
    k, lo, hi, tile_start, offs, mask = _task(tl.program_id(0), task_param, task_lo, task_hi, TILE)
    x_ptr = tl.load(param_ptrs + k).to(tl.pointer_type(tl.float32)) + (offs - tl.load(param_start + k))
    x = tl.load(x_ptr, mask=mask)
    u = tl.load(delta_ptr + offs, mask=mask)
    if HAS_DECAY:
        decay = x * wd
        w = tl.load(w_ptr + offs, mask=mask) * mu + decay
        tl.store(w_ptr + offs, w, mask=mask)
        if NESTEROV:
            u = (u + w * mu) + decay
        else:
            u = u + w
    tl.store(x_ptr, x - u * lr, mask=mask)


# --- the functions ``_kernels`` dispatches to (signatures of ``_torch_kernels``) -------------------
def _check(t: torch.Tensor, what: str, dtype=torch.float32) -> None:
    if t.dim() != 1 or t.dtype != dtype or not t.is_contiguous():
        raise ValueError(f"{what} must be a contiguous 1-D {dtype} tensor, got shape {tuple(t.shape)} "
                         f"{t.dtype}{'' if t.is_contiguous() else ', not contiguous'}")


def _payload(t: Tasks, partial: torch.Tensor, words: torch.Tensor, numel: int) -> Tuple[torch.Tensor, torch.Tensor]:
    scales = torch.empty(len(t.sizes), dtype=torch.float32, device=partial.device)
    _scales_kernel[(len(t.sizes),)](partial, t.first, t.sizes, scales, **_LAUNCH)
    if not bool(torch.isfinite(scales).all()):
        bad = int((~torch.isfinite(scales)).nonzero()[0])
        raise ValueError(f"blocksign: non-finite values (inf or NaN) in block {bad}; check the gradients")
    return scales, words.view(torch.uint8)[:(numel + 7) // 8]


def _buffers(t: Tasks, numel: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    partial = torch.empty(t.count, dtype=torch.float64, device=device)
    words = torch.zeros(math.ceil(numel / 32), dtype=torch.int32, device=device).view(torch.uint32)
    return partial, words


def _feedback(d, error, block_sizes, segments, prev_scales, prev_bits, has_error, tile):
    n = d.numel()
    _check(d, "d")
    t = tasks(tuple(block_sizes), n, d.device, tile)
    partial, words = _buffers(t, n, d.device)
    pieces = _pieces(segments, n, t, d.device) if has_error else (d,) * 4
    prev = (prev_scales, prev_bits) if prev_scales is not None else (d, d)
    _feedback_kernel[(t.count,)](d, error if has_error else d, *prev, *pieces, t.block, t.lo, t.hi, partial, words,
                                 HAS_ERROR=has_error, HAS_PREV=prev_scales is not None, TILE=tile, **_LAUNCH)
    return _payload(t, partial, words, n)


def blocksign_compress(x: torch.Tensor, block_sizes: Sequence[int], tile: int = TILE):
    """Scales ||x_b||_1/d_b (float32 [B]) and packed signs (uint8 [ceil(n/8)]) of a float32 [n] x.
    Raises ValueError for a block with inf or NaN."""
    return _feedback(x, None, block_sizes, (), None, None, False, tile)


def blocksign_feedback(d: torch.Tensor, error: torch.Tensor, block_sizes: Sequence[int], segments: Segments,
                       prev_scales: Optional[torch.Tensor] = None, prev_bits: Optional[torch.Tensor] = None,
                       tile: int = TILE):
    """The worker step: p = d + r·(e − C_prev) into ``error``; returns C(p) as (scales, bits)."""
    _check(error, "error")
    if error.numel() != d.numel():
        raise ValueError(f"d has {d.numel()} elements, error {error.numel()}")
    return _feedback(d, error, block_sizes, segments, prev_scales, prev_bits, True, tile)


def _stacked(scales: List[torch.Tensor], bits: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    if len(scales) != len(bits) or not scales:
        raise ValueError(f"need one or more payloads with scales and bits, got {len(scales)} and {len(bits)}")
    return torch.stack(scales), torch.stack(bits)


def blocksign_server_feedback(scales: List[torch.Tensor], bits: List[torch.Tensor], error: torch.Tensor,
                              block_sizes: Sequence[int], segments: Segments,
                              prev_scales: Optional[torch.Tensor] = None, prev_bits: Optional[torch.Tensor] = None,
                              tile: int = TILE):
    """The server step: p = (1/M)·Σ_i C_i + r·(ẽ − C_prev) into ``error``; returns C(p)."""
    n = error.numel()
    _check(error, "error")
    t = tasks(tuple(block_sizes), n, error.device, tile)
    partial, words = _buffers(t, n, error.device)
    s, b = _stacked(scales, bits)
    prev = (prev_scales, prev_bits) if prev_scales is not None else (error, error)
    _server_kernel[(t.count,)](s, b, len(scales), s.shape[1], b.shape[1], error, *prev,
                               *_pieces(segments, n, t, error.device), t.block, t.lo, t.hi, partial, words,
                               HAS_PREV=prev_scales is not None, TILE=tile, **_LAUNCH)
    return _payload(t, partial, words, n)


def blocksign_decompress_mean(scales: List[torch.Tensor], bits: List[torch.Tensor], block_sizes: Sequence[int],
                              numel: int, out: Optional[torch.Tensor] = None, tile: int = TILE) -> torch.Tensor:
    """(1/M)·Σ_i scale_i,b·sign_i as float32 [numel] (into ``out`` when given)."""
    s, b = _stacked(scales, bits)
    out = torch.empty(numel, dtype=torch.float32, device=s.device) if out is None else out
    _check(out, "out")
    if numel:
        t = tasks(tuple(block_sizes), numel, s.device, tile)
        _decompress_kernel[(t.count,)](s, b, len(scales), s.shape[1], b.shape[1], out, t.block, t.lo, t.hi,
                                       TILE=tile, **_LAUNCH)
    return out


def blocksign_decompress(scales: torch.Tensor, bits: torch.Tensor, block_sizes: Sequence[int], numel: int,
                         out: Optional[torch.Tensor] = None, tile: int = TILE) -> torch.Tensor:
    """scale_b·sign as float32 [numel] (into ``out`` when given)."""
    return blocksign_decompress_mean([scales], [bits], block_sizes, numel, out=out, tile=tile)


def gather_momentum(grads: Grads, d: torch.Tensor, momentum: Momentum) -> bool:
    """``_torch_kernels.gather_momentum``: the gradients gathered into ``d`` by torch, then
    m' = μ·m + g into ``momentum.next`` and d = g + μ·m' (nesterov) or m' in one launch per stretch of
    parameters with the same μ and nesterov (float32 [n] each). Returns whether every element of g is
    finite."""
    for t, what in ((d, "d"), (momentum.current, "momentum"), (momentum.next, "momentum_out")):
        _check(t, what)
    finite = torch_path.gather(grads.grads, grads.sizes, d, grads.inv_scale)
    for lo, hi, mu, nesterov in torch_path.runs(grads.sizes, momentum.mus, momentum.nesterovs):
        m, m_out = momentum.current[lo:hi], momentum.next[lo:hi]
        if mu == 0:
            if m_out.data_ptr() != m.data_ptr():
                m_out.copy_(m)
        elif hi > lo:
            _momentum_kernel[(triton.cdiv(hi - lo, ELEMENTWISE),)](d[lo:hi], m, m_out, hi - lo, mu,
                                                                    NESTEROV=bool(nesterov), BLOCK=ELEMENTWISE,
                                                                    **_LAUNCH)
    return finite


def descend_(params: List[torch.Tensor], delta: torch.Tensor, decay_buffer: Optional[torch.Tensor],
             descent: Descent) -> None:
    """The update of SPEC §1 for one param group (``Descent``), in one launch that reads every parameter
    (contiguous float32 tensors) in place; ``delta`` (float32 [Σ numel], the group's Δ̃) is read only and
    ``decay_buffer`` (likewise) updated when the weight decay is not 0."""
    lr, mu, weight_decay, nesterov = descent
    _check(delta, "delta")
    sizes = [p.numel() for p in params]
    if sum(sizes) != delta.numel():
        raise ValueError(f"delta has {delta.numel()} elements, the parameters {sum(sizes)}")
    kept = [(p, n) for p, n in zip(params, sizes) if n]
    if not kept:
        return
    device = delta.device
    t = tasks(tuple(n for _, n in kept), delta.numel(), device, ELEMENTWISE)
    ptrs = torch.tensor([p.data_ptr() for p, _ in kept], dtype=torch.int64).to(device)
    has_decay = weight_decay != 0
    _descend_kernel[(t.count,)](ptrs, t.first_offset, delta, decay_buffer if has_decay else delta, lr, mu,
                                weight_decay, t.block, t.lo, t.hi, HAS_DECAY=has_decay, NESTEROV=bool(nesterov),
                                TILE=ELEMENTWISE, **_LAUNCH)
