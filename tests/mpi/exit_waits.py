"""At exit a rank waits for the others (hvd_distef/comm.py, _barrier_at_exit): rank 0 checks, in an
atexit handler registered before the optimizer's (so it runs after it), that rank 1 reached the end
of its script, which rank 1 does a second after the last step."""
import atexit
import sys
import time
from pathlib import Path

import torch
from mpi4py import MPI

import hvd_distef

rank = MPI.COMM_WORLD.Get_rank()
marker = Path(sys.argv[1])
if rank == 0:
    atexit.register(lambda: print(f"rank 1 had ended: {marker.exists()}", flush=True))
model = torch.nn.Linear(4, 2)
opt = hvd_distef.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
model(torch.randn(3, 4)).sum().backward()
opt.step()
if rank == 1:
    time.sleep(1.0)
    marker.write_text("done")
