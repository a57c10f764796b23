"""Who initializes MPI decides who finalizes it (hvd_distef/comm.py, ``initialize_mpi``).

``after-peer-ends`` (3 ranks): the usual order (hvd_distef imported, then hvd.init()). After the last
step rank 0 sends each peer a last message over COMM_WORLD and ends; ranks 1 and 2 wait until rank 0
has reached its exit and Horovod has shut down everywhere (one rank's shutdown stops every rank's
Horovod), then receive it and exchange messages with each other over COMM_WORLD: the last messages of
ranks on a slower link do. Were MPI Horovod's, Horovod's thread would have finalized it under them.

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
from mpi4py import MPI  # noqa: E402

world, rank = MPI.COMM_WORLD, hvd.rank()
if rank == 0:
    for peer in range(1, world.size):
        world.send(f"last message of rank 0 to rank {peer}", dest=peer)  # small: sent before rank 0 ends
    marker.write_text("rank 0 at its exit")
else:
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(2.0)  # Horovod's shutdown reaches this rank within a few of its 1-5 ms cycles
    last = world.recv(source=0)
    peer = 3 - rank  # ranks 1 and 2 talk to each other
    heard = world.sendrecv(f"rank {rank} to rank {peer}", dest=peer, source=peer)
    print(f"rank {rank} used MPI after rank 0 ended: {last!r}, {heard!r}", flush=True)
