"""``majority_vote``: signum with majority vote (Bernstein et al. 2019), a baseline (SPEC §3).

Workers send the packed signs of their momentum m = μ·m + (1−μ)·g; rank 0 takes the sign of the
sum of the M signs (0 on ties) and broadcasts it as two bit masks (sign, non-zero); the
optimizer then applies x = x − η·(vote + λ·x). Scales and error feedback play no part.

Bytes per step (b = ceil(d/8)): a non-root rank sends b and receives 2b; rank 0 receives
(M−1)·b and sends (M−1)·2b.
"""
from __future__ import annotations

import math

import torch

from .. import _kernels
from .base import ROOT, RootServer


class MajorityVote(RootServer):
    name = "majority_vote"
    update_rule = "signum"
    keeps_server_error = False

    def __init__(self, comm, compressor, tensor_sizes, device="cpu", delta=None):
        if compressor.name not in ("sign", "blocksign"):
            raise ValueError(f"topology 'majority_vote' sends plain signs; use compression sign or blocksign "
                             f"(their scales are not used), not {compressor.name!r}")
        super().__init__(comm, compressor, tensor_sizes, device, delta)
        self.sign_bytes = math.ceil(self.numel / 8)

    def exchange(self, signs: torch.Tensor) -> torch.Tensor:
        """Packed signs of this worker's momentum in; the vote (-1, 0, +1 as float32) out."""
        vote = self.gather_reduce(signs, lambda gathered: _kernels.majority_vote(gathered, self.numel),
                                  self.buffer("vote", 2 * self.sign_bytes))
        self.comm.bcast(vote, ROOT)
        return _kernels.unpack_vote(vote, self.numel, out=self.delta)
