"""Model, data and helpers shared by the multi-rank check scripts."""
import hashlib
import io

import torch
from mpi4py import MPI

import hvd_distef

COMM = MPI.COMM_WORLD


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def batch(rank, step, n=16):
    gen = torch.Generator().manual_seed(100_003 * step + rank)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def loss_of(model, rank, step):
    x, y = batch(rank, step)
    return torch.nn.functional.cross_entropy(model(x), y)


def grads_at(params, rank, step):
    """Gradient of worker ``rank``'s step-``step`` loss at ``params`` (a fresh model, no side effects)."""
    model = make_model()
    with torch.no_grad():
        for p, v in zip(model.parameters(), params):
            p.copy_(v)
    loss_of(model, rank, step).backward()
    return [p.grad.clone() for p in model.parameters()]


def sgd_two_groups(model, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4):
    """Two param groups with different lr and weight decay, to exercise per-group ratios."""
    first, second = list(model[0].parameters()), list(model[2].parameters())
    return torch.optim.SGD([{"params": first}, {"params": second, "lr": lr / 2, "weight_decay": weight_decay * 2}],
                           lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


def hypers_of(opt):
    """Per-tensor hyper-parameters for tests/reference.py."""
    return [{"group": gi, "momentum": g["momentum"], "nesterov": g["nesterov"], "weight_decay": g["weight_decay"]}
            for gi, g in enumerate(opt.param_groups) for _ in g["params"]]


def flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


def assert_identical_across_ranks(params, what=""):
    digest = hashlib.sha1(flat(params).numpy().tobytes()).hexdigest()
    digests = COMM.allgather(digest)
    assert len(set(digests)) == 1, f"ranks hold different parameters {what}: {digests}"


def train_step(model, opt, rank, step):
    opt.zero_grad()
    loss_of(model, rank, step).backward()
    opt.step()


def roundtrip(obj):
    """What torch.save then torch.load gives back."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def wrap(model, opt, **kw):
    return hvd_distef.DistributedOptimizer(opt, named_parameters=model.named_parameters(), **kw)
