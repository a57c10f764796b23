"""Training where one rank dies (SIGKILL) or hangs mid-run: the job must end on every rank, fast.

    python fault_rank_dies.py kill|hang
"""
import os
import signal
import sys
import time

from common import COMM, make_model, sgd_two_groups, train_step, wrap

mode = sys.argv[1]
model = make_model()
opt = wrap(model, sgd_two_groups(model), compression="blocksign", topology="ps", timeout_s=5)
for t in range(1000):
    if t == 3 and COMM.rank == 1:
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(3600)  # hang: alive, but never reaches the exchange
    train_step(model, opt, COMM.rank, t)
print("unreachable: training finished", flush=True)
