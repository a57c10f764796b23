"""Ranks sharing one GPU (issue 14): each trains the same model on cuda:0 and on the CPU; the GPU
parameters must be bit-identical on every rank and equal the CPU run's to float rounding."""
import hashlib

import torch
from mpi4py import MPI

from harness import run
from tests import cuda_train


def case(topology, compression):
    def check():
        gpu = cuda_train.train("cuda", topology, compression, rank=MPI.COMM_WORLD.rank)
        digests = MPI.COMM_WORLD.allgather(hashlib.sha1(gpu.numpy().tobytes()).hexdigest())
        assert len(set(digests)) == 1, f"ranks hold different parameters: {digests}"
        cpu = cuda_train.train("cpu", topology, compression, rank=MPI.COMM_WORLD.rank)
        torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-6)
        return f"max |gpu - cpu| = {(gpu - cpu).abs().max().item():.3g}"
    return check


if __name__ == "__main__":
    run({f"{t}-{c}": case(t, c) for t, c in cuda_train.COMBINATIONS})
