"""The fused buffer of SPEC §4: which parameters are the optimizer's work, where each lies in the one
flat float32 vector a step exchanges, and how their gradients get there (SPEC §5a).

The optimizer's work is every parameter of the param groups that requires a gradient when the
optimizer is built; a parameter with ``requires_grad=False`` (any dtype: a frozen backbone, an int
buffer registered as a parameter) is not fused, not sent and never changed.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

Range = Tuple[int, int]


def offsets(sizes: Sequence[int]) -> List[Range]:
    """(start, stop) of consecutive pieces of these sizes."""
    bounds, start = [], 0
    for n in sizes:
        bounds.append((start, start + n))
        start += n
    return bounds


def parameter_names(param_groups: Sequence[dict], named_parameters) -> Dict[torch.Tensor, str]:
    """Every parameter of the groups by name, with horovod.torch's checks and default names
    (``allreduce.noname.{group}.{index}``). Raises ValueError for names given twice or missing."""
    everything = [p for g in param_groups for p in g["params"]]
    if named_parameters is None:
        return {p: f"allreduce.noname.{i}.{j}" for i, g in enumerate(param_groups) for j, p in enumerate(g["params"])}
    named_parameters = list(named_parameters)
    if any(not isinstance(item, tuple) for item in named_parameters):
        raise ValueError("named_parameters should be a sequence of tuples (name, parameter), usually "
                         "produced by model.named_parameters().")
    seen, dups = set(), set()
    for name, _ in named_parameters:
        (dups if name in seen else seen).add(name)
    if dups:
        raise ValueError(f"Parameter names in named_parameters must be unique. Found duplicates: "
                         f"{', '.join(sorted(dups))}")
    names = {id(p): name for name, p in named_parameters}
    missing = [i for i, p in enumerate(everything) if id(p) not in names]
    if missing:
        raise ValueError(f"named_parameters was specified, but {len(missing)} of the optimizer's parameters "
                         f"were not named (e.g. index {missing[0]}); pass model.named_parameters() of the same model")
    return {p: names[id(p)] for p in everything}


class DoubleBuffer:
    """A flat float32 buffer (SPEC §4) that a step writes into ``next`` while ``current`` keeps its
    value: ``commit`` makes the step's values current once it has gone ahead on every rank, and a
    step that does not go ahead leaves everything as it was without a copy (SPEC §5a). The step's
    kernel reads ``current`` and writes ``next`` in the pass it makes anyway: no extra traffic."""

    def __init__(self, numel: int, device: torch.device | str = "cpu"):
        self.buffers = (torch.zeros(numel, dtype=torch.float32, device=device),
                        torch.zeros(numel, dtype=torch.float32, device=device))
        self.index = 0

    @property
    def current(self) -> torch.Tensor:
        return self.buffers[self.index]

    @property
    def next(self) -> torch.Tensor:
        return self.buffers[1 - self.index]

    def keep(self, ranges: Sequence[Range]) -> None:
        """These slices of the step's values are the current ones (what the step must not change)."""
        for a, b in ranges:
            self.next[a:b].copy_(self.current[a:b])

    def commit(self) -> None:
        self.index = 1 - self.index


class FusedLayout:
    """The optimizer's parameters laid end to end in one float32 vector.

    Attributes:
        group_params: per param group, its parameters that require a gradient.
        params: all of them, in group order (the fused order); ``frozen``: the others.
        names_by_param: horovod.torch's ``_parameter_names`` (every parameter of the groups).
        names, sizes, bounds: per fused parameter: its name, element count, (start, stop).
        group_bounds: (start, stop) of each param group; ``numel``: the vector's length.

    Raises ValueError when a parameter that requires a gradient is not float32, or when they lie on
    more than one device (the fused buffer lives on one).
    """

    def __init__(self, param_groups: Sequence[dict], named_parameters: Optional[Iterable] = None):
        self.group_params = [[p for p in g["params"] if p.requires_grad] for g in param_groups]
        self.params: List[torch.Tensor] = [p for ps in self.group_params for p in ps]
        fused = {id(p) for p in self.params}
        self.frozen = [p for g in param_groups for p in g["params"] if id(p) not in fused]
        self.names_by_param = parameter_names(param_groups, named_parameters)
        self.names = [self.names_by_param[p] for p in self.params]
        for name, p in zip(self.names, self.params):
            if p.dtype != torch.float32:
                raise ValueError(f"parameters that require a gradient must be float32 (the fused buffer is "
                                 f"float32); {name} is {p.dtype}")
        self.sizes = [p.numel() for p in self.params]
        self.bounds = offsets(self.sizes)
        self.group_bounds = offsets([sum(p.numel() for p in ps) for ps in self.group_params])
        self.group_param_bounds = offsets([len(ps) for ps in self.group_params])  # parameter indices
        self.numel = sum(self.sizes)
        self.device = self.params[0].device if self.params else torch.device("cpu")
        elsewhere = [f"{n} on {p.device}" for n, p in zip(self.names, self.params) if p.device != self.device]
        if elsewhere:
            raise ValueError(f"the parameters lie on more than one device ({self.names[0]} on {self.device}; "
                             f"{', '.join(elsewhere[:5])}{', ...' if len(elsewhere) > 5 else ''}): the fused buffer "
                             f"lives on one device. Run one process per GPU (each rank's model on its own GPU: "
                             f"torch.cuda.set_device(local_rank)), not a model split over several GPUs of a rank")

    def has_grad(self) -> List[bool]:
        return [p.grad is not None for p in self.params]

    def check_params(self) -> None:
        """Raises ValueError for a fused parameter that is no longer float32, or one that was not fused
        (frozen) and has a gradient now."""
        moved = [n for n, p in zip(self.names, self.params) if p.dtype != torch.float32]
        if moved:
            raise ValueError(f"{', '.join(moved)} is no longer float32 (the fused buffer is float32)")
        unfrozen = [self.names_by_param[p] for p in self.frozen if p.grad is not None]
        if unfrozen:
            raise ValueError(f"{', '.join(unfrozen)} had requires_grad=False when the optimizer was built and "
                             f"has a gradient now; build the DistributedOptimizer after unfreezing")

    def span(self, first: int, stop: int) -> Range:
        """The fused slice of parameters [first, stop)."""
        return (self.bounds[first][0], self.bounds[stop - 1][1]) if stop > first else (0, 0)

    def gather(self, out: torch.Tensor, first: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """The gradients of fused parameters [first, stop) (default: all) into their slice of
        ``out`` (None as zeros, sparse densified, as Horovod's ``sparse_as_dense``); returns that slice."""
        stop = len(self.params) if stop is None else stop
        a, b = self.span(first, stop)
        parts = []
        for p in self.params[first:stop]:
            g = p.grad
            if g is None:
                parts.append(out.new_zeros(p.numel()))
            else:
                parts.append((g.to_dense() if g.is_sparse else g).reshape(-1))
        return torch.cat(parts, out=out[a:b]) if parts else out[a:b]

    def grads(self, first: int, stop: int) -> List[torch.Tensor]:
        """The gradients of fused parameters [first, stop) where backward left them, dense (a sparse one
        densified, as Horovod's ``sparse_as_dense``); an empty tensor where there is none."""
        empty = torch.empty(0, device=self.device)
        return [empty if p.grad is None else p.grad.to_dense() if p.grad.is_sparse else p.grad
                for p in self.params[first:stop]]

    def nonfinite_grads(self, first: int, stop: int) -> List[str]:
        """Names of the fused parameters [first, stop) whose gradient holds a NaN or inf."""
        return [n for n, g in zip(self.names[first:stop], self.grads(first, stop)) if not bool(torch.isfinite(g).all())]

    def nonfinite(self, flat: torch.Tensor, first: int = 0, stop: Optional[int] = None) -> List[str]:
        """Names of the fused parameters [first, stop) (default: all) whose slice of ``flat`` holds a
        NaN or inf (one reduction when none does)."""
        stop = len(self.params) if stop is None else stop
        a, b = self.span(first, stop)
        if a == b or bool(torch.isfinite(flat[a:b].sum())):
            return []
        return [n for n, (lo, hi) in zip(self.names[first:stop], self.bounds[first:stop])
                if not bool(torch.isfinite(flat[lo:hi]).all())]

    def idle(self, has_grad: Sequence[bool]) -> Tuple[List[Range], List[torch.Tensor]]:
        """The slices and the parameters that no rank has a gradient for (``has_grad`` agreed by all)."""
        which = [i for i, h in enumerate(has_grad) if not h]
        return [self.bounds[i] for i in which], [self.params[i] for i in which]

    def write_grads(self, flat: torch.Tensor, has_grad: Sequence[bool]) -> None:
        """``flat``'s slices into p.grad where some rank had a gradient (None stays None elsewhere)."""
        for p, (a, b), h in zip(self.params, self.bounds, has_grad):
            if not h:
                continue
            view = flat[a:b].view_as(p)
            if p.grad is None or p.grad.is_sparse:
                p.grad = view.clone()
            else:
                p.grad.copy_(view)

    def fill_nan(self, has_grad: Sequence[bool]) -> None:
        """NaN into p.grad where some rank had a gradient (what a non-finite gradient anywhere leaves
        after Horovod's ``synchronize()``)."""
        for p, h in zip(self.params, has_grad):
            if h:
                p.grad = torch.full_like(p, float("nan"))

    def read_grads(self, flat: torch.Tensor) -> None:
        """p.grad back into ``flat`` where it is set (what the user left after ``synchronize()``)."""
        for p, (a, b) in zip(self.params, self.bounds):
            if p.grad is not None:
                flat[a:b].copy_(p.grad.reshape(-1))

    def views(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """``flat``'s slice for each fused parameter, shaped like it."""
        return [flat[a:b].view_as(p) for p, (a, b) in zip(self.params, self.bounds)]
