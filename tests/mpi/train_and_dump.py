"""Train a few `ps` + blocksign steps and save rank 0's flat parameters (after checking all ranks agree)."""
import sys

import torch
from common import COMM, assert_identical_across_ranks, flat, make_model, sgd_two_groups, train_step, wrap

import horovod.torch as hvd
from hvd_distef import _kernels

hvd.init()
model = make_model()
opt = wrap(model, sgd_two_groups(model), compression="blocksign", topology="ps")
sched = torch.optim.lr_scheduler.MultiStepLR(opt, [4], gamma=0.1)
for t in range(8):
    train_step(model, opt, COMM.rank, t)
    sched.step()
assert_identical_across_ranks(model.parameters())
if COMM.rank == 0:
    torch.save({"params": flat(model.parameters()), "compiled": _kernels.compiled is not None}, sys.argv[1])
