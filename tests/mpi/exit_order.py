"""Who initializes MPI decides who finalizes it (hvd_distef/comm.py, ``initialize_mpi``).

``after-peer-ends``: the usual order (hvd_distef imported, then hvd.init()). Rank 0 ends right after
the last step; rank 1 waits until rank 0 has reached its exit and Horovod has shut down everywhere
(one rank's shutdown stops every rank's Horovod), then still talks MPI: the last messages of a rank
on a slower link do. Were MPI Horovod's, Horovod's thread would have finalized it under rank 1.

``horovod-first``: hvd.init() before importing hvd_distef: every rank refuses to build an optimizer.
"""
import sys
import time
from pathlib import Path

import horovod.torch as hvd
import torch

mode, marker = sys.argv[1], Path(sys.argv[2])
if mode == "horovod-first":
    hvd.init()
import hvd_distef  # noqa: E402

hvd.init()
model = torch.nn.Linear(4, 2)
try:
    opt = hvd_distef.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
except hvd_distef.HvdDistefError as exc:
    print(f"rank {hvd.rank()}: {exc}", flush=True)
    sys.exit(0)
model(torch.randn(3, 4)).sum().backward()
opt.step()
if hvd.rank() == 0:
    marker.write_text("rank 0 at its exit")
else:
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(2.0)  # Horovod's shutdown reaches this rank within a few of its 1-5 ms cycles
    from mpi4py import MPI
    total = MPI.COMM_SELF.allreduce(1)
    print(f"rank 1 used MPI after rank 0 ended: {total}", flush=True)
