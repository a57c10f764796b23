"""Hot loops in plain PyTorch (CPU or CUDA): blockwise sign compression and the optimizer's
element-wise passes. The fallback where the compiled ``cpp_ops`` are absent or the tensors are on
CUDA, and the reference they are tested against (same signatures, same bits, scales and updates to
float rounding)."""
from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from .kernel_args import Descent, Feedback, Grads, Momentum, Pieces, Segments

_BIT_WEIGHTS = {}


def _weights(device: torch.device) -> torch.Tensor:
    if device not in _BIT_WEIGHTS:
        _BIT_WEIGHTS[device] = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)
    return _BIT_WEIGHTS[device]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool vector into ceil(n/8) bytes, element i -> bit i%8 of byte i//8."""
    n = mask.numel()
    bits = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8, device=mask.device)
    bits[:n] = mask
    return (bits.view(-1, 8) * _weights(mask.device)).sum(1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: a bool vector of ``numel`` elements."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.unsqueeze(1) >> shifts) & 1).reshape(-1)[:numel].bool()


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Pack sign(x) with sign(0) = +1 (also for -0.0): bit set where x >= 0."""
    return pack_bits(x >= 0)


def unpack_signs(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of ``pack_signs`` as float32 +-1."""
    return unpack_bits(bits, numel).to(torch.float32).mul_(2).sub_(1)


def signum_momentum(g: torch.Tensor, momentum: torch.Tensor, momentum_out: torch.Tensor,
                    segments: Segments) -> torch.Tensor:
    """Signum's worker step (SPEC §3): per segment (start, stop, μ) of g, m' = μ·m + (1−μ)·g into
    ``momentum_out`` (μ = 0: m' = m and g itself is sent; 0 where no segment covers); returns the
    packed signs of what is sent. g is untouched."""
    sent = g.clone()
    for start, stop, mu in segments:
        m, m_next = momentum[start:stop], momentum_out[start:stop]
        if mu == 0:
            m_next.copy_(m)
            continue
        sent[start:stop] = torch.mul(m, mu, out=m_next).add_(torch.mul(g[start:stop], 1 - mu))
    covered = sorted((a, b) for a, b, _ in segments)
    at = 0
    for a, b in covered + [(g.numel(), g.numel())]:
        if at < a:
            momentum_out[at:a].copy_(momentum[at:a])
        at = max(at, b)
    return pack_signs(sent)


def majority_vote(rows: torch.Tensor, numel: int) -> torch.Tensor:
    """Signum's vote on M packed sign rows (concatenated): the positive mask, then the non-zero
    mask of sign(Σ_i sign_i) (0 on a tie), 2·ceil(numel/8) bytes."""
    b = (numel + 7) // 8
    total = torch.stack([unpack_signs(row, numel) for row in rows.view(-1, b)]).sum(0)
    return torch.cat([pack_bits(total > 0), pack_bits(total != 0)])


def unpack_vote(vote: torch.Tensor, numel: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The vote as float32 -1, 0, +1 (written into ``out`` when given)."""
    b = (numel + 7) // 8
    positive, nonzero = unpack_bits(vote[:b], numel), unpack_bits(vote[b:], numel)
    return torch.mul(positive.to(torch.float32).mul_(2).sub_(1), nonzero, out=out)


def block_l1(x: torch.Tensor, block_sizes: Sequence[int]) -> torch.Tensor:
    """||x_b||_1 for each contiguous block, float64 [B] (as the compiled kernel sums: a block of
    float32 values near 3.4e38 has a finite mean but no float32 sum); one reduction kernel whatever
    B is, so that a block gives the same bits whether it is compressed alone or with others."""
    if not block_sizes:
        return x.new_zeros(0, dtype=torch.float64)
    return torch.stack(torch._foreach_norm(list(x.split(list(block_sizes))), 1, dtype=torch.float64))


def expand_blocks(values: torch.Tensor, block_sizes: Sequence[int], numel: int) -> torch.Tensor:
    """Repeat ``values[b]`` over block b: a float32 [numel] vector."""
    if len(block_sizes) == 1:
        return values.expand(numel)
    lengths = torch.as_tensor(block_sizes, device=values.device)
    return torch.repeat_interleave(values, lengths, output_size=numel)


def compensate(d: torch.Tensor, error: torch.Tensor, segments: Segments,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """p = d + (η_{t-1}/η_t)·e, each param group with its own ratio (SPEC §1; ratio 0 where no
    segment covers), into ``out`` (which may be d itself) or a new vector; d is untouched unless it
    is ``out``. The product r·e is rounded before the sum, as in the compiled kernel (torch's
    ``add_(alpha=r)`` fuses the two into one rounding on CPUs with FMA and would differ)."""
    if out is None:
        p = d.clone()
    elif out.data_ptr() == d.data_ptr() and out.shape == d.shape:
        p = out
    else:
        p = out.copy_(d)
    for start, stop, ratio in segments:
        if ratio != 0.0:
            p[start:stop].add_(torch.mul(error[start:stop], ratio))
    return p


def half_feedback(sources: Sequence[torch.Tensor], error: torch.Tensor, segments: Segments,
                  max_value: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The error step of ``fp16`` (SPEC §1): p = x + r·e; Δ = float16(p) saturated at ±max_value;
    e <- p − Δ. Returns Δ (float16, in ``out`` when given). x is ``sources[0]`` where that is the
    float32 d (a worker's; left untouched), or the server's mean ((h_0 + h_1) + ...)/M of float16
    payloads (one: h_0)."""
    if len(sources) == 1 and sources[0].dtype == torch.float32:
        p = compensate(sources[0], error, segments)
    else:
        p = sources[0].to(torch.float32)
        for h in sources[1:]:
            p.add_(h)  # float32 + float(h): the sum of decompressed payloads
        if len(sources) > 1:
            p.div_(len(sources))
        p = compensate(p, error, segments, out=p)
    values = p.to(torch.float16) if out is None else out.copy_(p)
    values.clamp_(-max_value, max_value)  # = float16(clamp(p)): FP16.compress
    torch.sub(p, values, out=error)
    return values


def blocksign_compress(x: torch.Tensor, block_sizes: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scales ||x_b||_1/d_b [B] and packed signs of x: the blocksign payload of SPEC §2."""
    sizes = torch.as_tensor(block_sizes, dtype=torch.float64, device=x.device)
    scales = (block_l1(x, block_sizes) / sizes).to(torch.float32)
    if not bool(torch.isfinite(scales).all()):
        bad = int((~torch.isfinite(scales)).nonzero()[0])
        raise ValueError(f"blocksign: non-finite values (inf or NaN) in block {bad}; check the gradients")
    return scales, pack_signs(x)


def blocksign_decompress(scales: torch.Tensor, bits: torch.Tensor, block_sizes: Sequence[int],
                         numel: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """C(x) = scale_b · sign(x_b) as a float32 [numel] vector (written into ``out`` when given)."""
    return torch.mul(unpack_signs(bits, numel), expand_blocks(scales, block_sizes, numel), out=out)


def blocksign_feedback(d: torch.Tensor, error: torch.Tensor, block_sizes: Sequence[int], segments: Segments,
                       prev_scales: Optional[torch.Tensor] = None,
                       prev_bits: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One error-feedback step with blocksign, its last line deferred (as the compiled kernel does
    it, in one pass): e = error − C_prev when the previous step's payload C_prev is given;
    p = d + r·e; returns (scales, bits) = C(p) and leaves p in ``error``: e <- p − C(p) is the
    next call's first line (or ``BlockSign.settle``)."""
    if prev_scales is not None:
        error.sub_(blocksign_decompress(prev_scales, prev_bits, block_sizes, error.numel()))
    p = compensate(d, error, segments)
    scales, bits = blocksign_compress(p, block_sizes)
    error.copy_(p)
    return scales, bits


def blocksign_decompress_mean(scales: List[torch.Tensor], bits: List[torch.Tensor],
                              block_sizes: Sequence[int], numel: int,
                              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(1/M)·Σ_i C_i for M blocksign payloads: the server's first line in SPEC §1."""
    acc = torch.zeros(numel, dtype=torch.float32, device=scales[0].device) if out is None else out.zero_()
    for s, b in zip(scales, bits):
        acc.add_(blocksign_decompress(s, b, block_sizes, numel))
    return acc.div_(len(scales))



def blocksign_server_feedback(scales: List[torch.Tensor], bits: List[torch.Tensor], error: torch.Tensor,
                              block_sizes: Sequence[int], segments: Segments,
                              prev_scales: Optional[torch.Tensor] = None,
                              prev_bits: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The server step: p = (1/M)·Σ_i C_i + r·ẽ;  (scales, bits) = C(p);  ẽ <- p − C(p), deferred
    like ``blocksign_feedback``."""
    mean = blocksign_decompress_mean(scales, bits, block_sizes, error.numel())
    return blocksign_feedback(mean, error, block_sizes, segments, prev_scales, prev_bits)


def gather(grads: Sequence[torch.Tensor], sizes: Sequence[int], d: torch.Tensor, inv_scale: Optional[float]) -> bool:
    """The gradients (an empty tensor: zeros of that size) end to end into ``d``, times ``inv_scale``
    when given; returns whether every element is finite."""
    parts = [g.reshape(-1) if g.numel() else d.new_zeros(n) for g, n in zip(grads, sizes)]
    if parts:
        torch.cat(parts, out=d)
    if inv_scale is not None:
        d.mul_(inv_scale)
    return bool(torch.isfinite(d).all())


def runs(sizes: Sequence[int], mus: Sequence[float], nesterovs: Sequence[bool]) -> Iterator[Tuple[int, int, float, bool]]:
    """(start, stop, μ, nesterov) of the longest stretches of consecutive parameters with the same μ and
    nesterov, in the elements of the parameters end to end."""
    start, first = 0, 0
    for k in range(1, len(sizes) + 1):
        if k == len(sizes) or (mus[k], nesterovs[k]) != (mus[first], nesterovs[first]):
            stop = start + sum(sizes[first:k])
            yield start, stop, mus[first], nesterovs[first]
            start, first = stop, k


def momentum_step(d: torch.Tensor, momentum: torch.Tensor, momentum_out: torch.Tensor, mu: float,
                  nesterov: bool) -> None:
    """With g in ``d``: m' = μ·m + g into ``momentum_out`` (another buffer, or ``momentum`` itself);
    d = g + μ·m' (nesterov) or m'; with μ = 0, d = g and m' = m."""
    if mu == 0:
        if momentum_out.data_ptr() != momentum.data_ptr():
            momentum_out.copy_(momentum)
        return
    torch.mul(momentum, mu, out=momentum_out).add_(d)
    if nesterov:
        d.add_(torch.mul(momentum_out, mu))
    else:
        d.copy_(momentum_out)


def gather_momentum(grads: Grads, d: torch.Tensor, momentum: Momentum) -> bool:
    """The worker's momentum of SPEC §1 (``Momentum``) from ``grads`` into ``d`` (float32 [Σ sizes]).
    Returns whether every element of g is finite."""
    finite = gather(grads.grads, grads.sizes, d, grads.inv_scale)
    for lo, hi, mu, nesterov in runs(grads.sizes, momentum.mus, momentum.nesterovs):
        momentum_step(d[lo:hi], momentum.current[lo:hi], momentum.next[lo:hi], mu, nesterov)
    return finite


def worker_blocksign_feedback(grads: Grads, momentum: Momentum, feedback: Feedback
                              ) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """The worker's side of SPEC §1 on one shard (``Feedback``): ``gather_momentum`` (each parameter with
    its own μ and nesterov) then ``blocksign_feedback``, with e read from ``error`` and p written to
    ``error_out`` (``error`` and the current momentum are left as they were); the momentum buffers are
    the shard's slices. Returns (scales, bits, usable): usable is False where a gradient element (times
    ``inv_scale``) or a block scale is not finite, and the payload is then meaningless. The compiled
    kernel does it in one pass over memory, d never written out."""
    error, offset, block_sizes = feedback.error, feedback.start, feedback.block_sizes
    n = error.numel()
    d = torch.empty(n, dtype=torch.float32, device=error.device)
    finite, start = True, 0
    for g, size, mu, nesterov in zip(grads.grads, grads.sizes, momentum.mus, momentum.nesterovs):
        lo, hi = max(start, offset), min(start + size, offset + n)
        if lo < hi:
            part = g.reshape(-1)[lo - start:hi - start] if g.numel() else g
            a, b = lo - offset, hi - offset
            finite &= gather_momentum(Grads([part], [b - a], grads.inv_scale), d[a:b],
                                      Momentum(momentum.current[a:b], momentum.next[a:b], [mu], [nesterov]))
        start += size
    if not finite:
        return error.new_zeros(len(block_sizes)), error.new_zeros((n + 7) // 8, dtype=torch.uint8), False
    feedback.error_out.copy_(error)
    try:
        scales, bits = blocksign_feedback(d, feedback.error_out, block_sizes, feedback.segments, feedback.prev_scales,
                                          feedback.prev_bits)
    except ValueError:  # a non-finite block scale
        return error.new_zeros(len(block_sizes)), error.new_zeros((n + 7) // 8, dtype=torch.uint8), False
    return scales, bits, True


def _views(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    return [part.view_as(p) for part, p in zip(flat.split([p.numel() for p in params]), params)]


def descend_(params: List[torch.Tensor], delta: torch.Tensor, decay_buffer: Optional[torch.Tensor],
             descent: Descent) -> None:
    """The update of SPEC §1 for one param group (``Descent``): with weight decay, w = μ·w + λ·x and
    u = (Δ̃ + μ·w) + λ·x (nesterov) or Δ̃ + w, else u = Δ̃; then x = x − η·u. ``delta`` is read only."""
    lr, mu, weight_decay, nesterov = descent
    u = _views(delta, params)
    if weight_decay != 0:
        decay = torch._foreach_mul(params, weight_decay)
        w = _views(decay_buffer, params)
        torch._foreach_mul_(w, mu)
        torch._foreach_add_(w, decay)
        u = torch._foreach_add(u, torch._foreach_mul(w, mu) if nesterov else w)
        if nesterov:
            torch._foreach_add_(u, decay)
    torch._foreach_sub_(params, torch._foreach_mul(u, lr))


def descend_blocksign_(params: List[torch.Tensor], pieces: Pieces, decay_buffer: Optional[torch.Tensor],
                       descent: Descent) -> None:
    """``descend_`` with the group's Δ̃ (float32, Σ numel of ``params``) given as blocksign ``Pieces``.
    Here Δ̃ is decompressed in full first; the compiled kernel decompresses it slice by slice inside the
    update. Raises ValueError for pieces that leave a gap."""
    n = sum(p.numel() for p in params)
    delta = torch.empty(n, dtype=torch.float32, device=pieces.scales[0].device if pieces.scales else "cpu")
    covered = 0
    for start, s, b, sizes in zip(*pieces):
        numel = sum(sizes)
        if start > covered:
            raise ValueError(f"a piece starts at {start}, leaving elements from {covered} without a payload")
        lo, hi = max(start, 0), min(start + numel, n)
        if lo < hi:
            delta[lo:hi] = blocksign_decompress(s, b, sizes, numel)[lo - start:hi - start]
        covered = max(covered, start + numel)
    if covered < n:
        raise ValueError(f"the pieces cover {covered} of {n} elements")
    descend_(params, delta, decay_buffer, descent)
