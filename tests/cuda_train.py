"""A few optimizer steps on a chosen device, for the CUDA tests: the same model, gradients and
hyper-parameters on the CPU and on a GPU, so that the two runs can be compared (SPEC §1, issue 14).

Gradients are drawn on the CPU from seeds of (rank, step) and moved to the device, so both runs see
the same numbers; the lr drops after the second step (η_{t-1}/η_t ≠ 1) and two param groups have
their own lr and weight decay.
"""
import torch

import hvd_distef

#: (topology, compression) pairs that every world size runs; qsgd is left out: its random draws come
#: from the device's generator, so a CUDA run differs from a CPU run by more than rounding
COMBINATIONS = ([(t, c) for t in ("ps", "sharded", "tree", "ring", "allgather")
                 for c in ("blocksign", "sign", "topk", "randomk", "fp16", "none")]
                + [("majority_vote", "blocksign"), ("majority_vote", "sign")])
STEPS = 4


def make_model(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5))
    return model.to(device)


def train(device, topology, compression, rank=0, steps=STEPS):
    """Parameters after ``steps`` steps, as one float32 CPU vector."""
    model = make_model(device)
    sgd = torch.optim.SGD([{"params": model[0].parameters()},
                           {"params": model[2].parameters(), "lr": 0.05, "weight_decay": 1e-3}],
                          lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    opt = hvd_distef.DistributedOptimizer(sgd, named_parameters=model.named_parameters(),
                                          compression=compression, topology=topology)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2], gamma=0.1)
    for step in range(steps):
        gen = torch.Generator().manual_seed(1000 * step + rank)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen).to(device)
        opt.step()
        sched.step()
    return torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])
