"""Constructs a DistributedOptimizer in a process started by `horovodrun --gloo` (no MPI world)."""
import horovod.torch as hvd
import torch

import hvd_distef

hvd.init()
model = torch.nn.Linear(3, 2)
hvd_distef.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters())
print("unreachable: constructed under Gloo", flush=True)
