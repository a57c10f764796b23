"""Training where one rank dies (SIGKILL), hangs, raises, is slow, or where the script ends after a
backward without step() (on every rank: exit; on rank 0 only: exit_one): the job must end on every
rank, fast, or go on where the rank is only slow.

    python fault_rank_dies.py kill|hang|raise|slow|exit|exit_one [TOPOLOGY]
"""
import os
import signal
import sys
import time

from common import COMM, loss_of, make_model, sgd_two_groups, train_step, wrap

import horovod.torch as hvd

mode = sys.argv[1]
topology = sys.argv[2] if len(sys.argv) > 2 else "ps"
hvd.init()
model = make_model()
options = {"timeout_s": 5} if mode in ("kill", "hang") else {"timeout_s": 600, "stall_warning_s": 1}
opt = wrap(model, sgd_two_groups(model), compression="none" if topology == "allreduce" else "blocksign",
           topology=topology, overlap=mode.startswith("exit"), bucket_cap_mb=0.0001, **options)
steps = 6 if mode in ("slow", "exit", "exit_one") else 1000
for t in range(steps):
    if t == 3 and COMM.rank == 1 and mode in ("kill", "hang", "raise"):
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "raise":
            raise RuntimeError("a data error on rank 1")
        time.sleep(3600)  # hang: alive, but never reaches the exchange
    if t == 3 and COMM.rank == 2 and mode == "slow":
        time.sleep(4)
    train_step(model, opt, COMM.rank, t)
if mode == "exit" or (mode == "exit_one" and COMM.rank == 0):  # a backward whose buckets go out, then the end
    opt.zero_grad()
    loss_of(model, COMM.rank, steps).backward()
    print("training finished", flush=True)
    sys.exit(0)
print("training finished" if mode == "slow" else "unreachable: training finished", flush=True)
