"""SPEC §1 simulated in one process for M workers, one tensor at a time, written apart from
hvd_distef so that tests compare two independent implementations of the algorithm."""
from typing import Callable, List, Sequence

import torch

Tensors = List[torch.Tensor]


def blocksign_per_tensor(ps: Tensors) -> Tensors:
    """C(p) with one block per tensor: (||p||_1/d)·sign(p), sign(0) = +1."""
    return [p.abs().sum() / p.numel() * torch.where(p >= 0, 1.0, -1.0) for p in ps]


def identity(ps: Tensors) -> Tensors:
    return [p.clone() for p in ps]


def sign_whole(ps: Tensors) -> Tensors:
    flat = torch.cat([p.reshape(-1) for p in ps])
    out = flat.abs().sum() / flat.numel() * torch.where(flat >= 0, 1.0, -1.0)
    return [o.view_as(p) for o, p in zip(out.split([p.numel() for p in ps]), ps)]


class ReferenceDistEF:
    """Parameters, worker momenta m_i, worker errors e_i, server error ẽ, weight-decay buffer w."""

    def __init__(self, params: Tensors, hypers: Sequence[dict], workers: int, compress: Callable[[Tensors], Tensors],
                 two_way: bool = True, error_decay=None):
        self.x = [p.detach().clone() for p in params]
        self.hypers = list(hypers)  # per tensor: momentum, nesterov, weight_decay, group
        self.M = workers
        self.compress = compress
        self.two_way = two_way  # False: one-way EF, the server averages and sends uncompressed
        self.error_decay = error_decay  # a fixed β for both errors instead of η_{t-1}/η_t
        zeros = lambda: [torch.zeros_like(p) for p in self.x]  # noqa: E731
        self.m = [zeros() for _ in range(workers)]
        self.e = [zeros() for _ in range(workers)]
        self.server_e = zeros()
        self.w = zeros()
        self.prev_lr = {}

    def worker_d(self, i: int, grads: Tensors) -> Tensors:
        """Worker i's momentum step: m_i = μ·m_i + g_i; d_i = μ·m_i + g_i (nesterov) or m_i."""
        out = []
        for j, g in enumerate(grads):
            mu = self.hypers[j]["momentum"]
            self.m[i][j] = mu * self.m[i][j] + g
            out.append(mu * self.m[i][j] + g if self.hypers[j]["nesterov"] else self.m[i][j])
        return out

    def step(self, worker_grads: List[Tensors], group_lrs: dict) -> None:
        lr = [group_lrs[h["group"]] for h in self.hypers]
        ratio = [self.prev_lr.get(h["group"], 0.0) / group_lrs[h["group"]] if self.error_decay is None
                 else self.error_decay for h in self.hypers]
        deltas = []
        for i in range(self.M):
            ps = [d + ratio[j] * self.e[i][j] for j, d in enumerate(self.worker_d(i, worker_grads[i]))]
            delta = self.compress(ps)
            self.e[i] = [p - dl for p, dl in zip(ps, delta)]
            deltas.append(delta)
        server_p = []
        for j in range(len(self.x)):
            total = deltas[0][j]
            for i in range(1, self.M):
                total = total + deltas[i][j]
            server_p.append(total / self.M + ratio[j] * self.server_e[j])
        if self.two_way:
            server_delta = self.compress(server_p)
            self.server_e = [p - dl for p, dl in zip(server_p, server_delta)]
        else:
            server_delta = server_p
        for j, h in enumerate(self.hypers):
            mu, wd = h["momentum"], h["weight_decay"]
            self.w[j] = mu * self.w[j] + wd * self.x[j]
            u = server_delta[j] + mu * self.w[j] + wd * self.x[j] if h["nesterov"] else server_delta[j] + self.w[j]
            self.x[j] = self.x[j] - lr[j] * u
        self.prev_lr = dict(group_lrs)


class ReferenceNodeEF(ReferenceDistEF):
    """Algorithm 2 with one worker per node (``hierarchical``): every rank's own momentum and d_i; a node's
    d is the mean of its ``local`` ranks' d_i (uncompressed); the node's worker error and compression, the
    server step over the nodes, the update as in SPEC §1. Ranks r·local .. (r+1)·local − 1 form node r."""

    def __init__(self, params: Tensors, hypers: Sequence[dict], workers: int, local: int,
                 compress: Callable[[Tensors], Tensors]):
        super().__init__(params, hypers, workers, compress)
        self.local, self.nodes = local, workers // local
        self.node_e = [[torch.zeros_like(p) for p in self.x] for _ in range(self.nodes)]

    def step(self, worker_grads: List[Tensors], group_lrs: dict) -> None:
        lr = [group_lrs[h["group"]] for h in self.hypers]
        ratio = [self.prev_lr.get(h["group"], 0.0) / group_lrs[h["group"]] for h in self.hypers]
        ds = [self.worker_d(i, worker_grads[i]) for i in range(self.M)]
        deltas = []
        for n in range(self.nodes):
            members = ds[n * self.local:(n + 1) * self.local]
            ps = []
            for j in range(len(self.x)):
                total = members[0][j]
                for d_i in members[1:]:
                    total = total + d_i[j]
                ps.append(total / self.local + ratio[j] * self.node_e[n][j])
            delta = self.compress(ps)
            self.node_e[n] = [p - dl for p, dl in zip(ps, delta)]
            deltas.append(delta)
        server_p = [sum(delta[j] for delta in deltas) / self.nodes + ratio[j] * self.server_e[j]
                    for j in range(len(self.x))]
        server_delta = self.compress(server_p)
        self.server_e = [p - dl for p, dl in zip(server_p, server_delta)]
        for j, h in enumerate(self.hypers):
            mu, wd = h["momentum"], h["weight_decay"]
            self.w[j] = mu * self.w[j] + wd * self.x[j]
            u = server_delta[j] + mu * self.w[j] + wd * self.x[j] if h["nesterov"] else server_delta[j] + self.w[j]
            self.x[j] = self.x[j] - lr[j] * u
        self.prev_lr = dict(group_lrs)


class ReferenceSignum:
    """Signum with majority vote (Bernstein et al. 2019) for M simulated workers, per tensor."""

    def __init__(self, params: Tensors, hypers: Sequence[dict], workers: int):
        self.x = [p.detach().clone() for p in params]
        self.hypers = list(hypers)
        self.m = [[torch.zeros_like(p) for p in self.x] for _ in range(workers)]

    def step(self, worker_grads: List[Tensors], group_lrs: dict) -> None:
        for j, h in enumerate(self.hypers):
            mu = h["momentum"]
            votes = 0
            for i, grads in enumerate(worker_grads):
                self.m[i][j] = mu * self.m[i][j] + (1 - mu) * grads[j]
                votes = votes + torch.where(self.m[i][j] >= 0, 1.0, -1.0)
            vote = torch.sign(votes)  # 0 on ties
            self.x[j] = self.x[j] - group_lrs[h["group"]] * (vote + h["weight_decay"] * self.x[j])
