"""DistributedOptimizer: fuses gradients, applies worker momentum and error feedback, runs the
topology's exchange and the update of SPEC §1 (or a baseline's own update rule)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from . import _kernels
from .comm import Comm
from .compressors import Compression, get_compressor
from .error_feedback import ErrorMemory, lr_ratio_segments
from .errors import HvdDistefError, NonFiniteGradientError
from .topologies import get_topology

NONFINITE_POLICIES = ("raise", "skip")


class DistributedOptimizer(torch.optim.SGD):
    """Wraps a ``torch.optim.SGD`` and trains with compressed communication (SPEC §1, §4).

    The wrapped optimizer supplies lr, momentum, nesterov and weight_decay per param group; torch
    LR schedulers drive this object as they would the SGD it wraps, and the error rescale
    η_{t-1}/η_t follows them.

    Args:
        optimizer: a ``torch.optim.SGD`` (dampening 0) over float32 parameters.
        named_parameters: ``model.named_parameters()``, for error messages and the rank agreement check.
        compression: a compressor name, ``Compression.<name>`` class, or configured instance.
        topology: one of ``hvd_distef.topologies.REGISTRY`` (``"ps"``, ``"allreduce"``, ...).
        backward_passes_per_step: backward passes accumulated locally per step; the gradient used
            is their mean.
        nonfinite: ``"raise"`` (every rank raises ``NonFiniteGradientError`` before touching any
            buffer) or ``"skip"`` (the step is skipped on every rank and counted).
        comm: an mpi4py communicator to use instead of ``MPI.COMM_WORLD`` (it is duplicated).
        timeout_s: abort the job when one of our collectives waits longer than this (a dead or hung
            peer); default: the HVD_DISTEF_TIMEOUT_S environment variable, else 300 s. The wait
            includes the other ranks' compute time before they reach the exchange.

    A parameter whose gradient is None counts as a zero gradient, on every rank, every step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer,
                 named_parameters: Optional[Iterable[Tuple[str, torch.Tensor]]] = None,
                 compression=Compression.blocksign, topology: str = "ps",
                 backward_passes_per_step: int = 1, nonfinite: str = "raise", comm=None,
                 timeout_s: Optional[float] = None):
        if not isinstance(optimizer, torch.optim.SGD):
            raise TypeError(f"hvd_distef.DistributedOptimizer wraps torch.optim.SGD (the algorithm of SPEC §1 "
                            f"is SGD with momentum), got {type(optimizer).__name__}")
        if int(backward_passes_per_step) != backward_passes_per_step or backward_passes_per_step < 1:
            raise ValueError(f"backward_passes_per_step must be a positive integer, got {backward_passes_per_step!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self._building = True
        super().__init__([dict(g) for g in optimizer.param_groups], **optimizer.defaults)
        self._building = False

        self.compressor = get_compressor(compression)
        topology_cls = get_topology(topology)
        self._validate_groups(topology_cls.update_rule)
        self.backward_passes_per_step = int(backward_passes_per_step)
        self.nonfinite = nonfinite

        self._params: List[torch.Tensor] = [p for g in self.param_groups for p in g["params"]]
        self._names = self._param_names(named_parameters)
        self._sizes = [p.numel() for p in self._params]
        self._group_bounds = self._bounds([sum(p.numel() for p in g["params"]) for g in self.param_groups])
        self.numel = sum(self._sizes)
        self.device = self._params[0].device if self._params else torch.device("cpu")

        self.comm = Comm(comm, timeout_s)
        self._topology_name = topology
        self._check_ranks_agree()
        self.topology = topology_cls(self.comm, self.compressor, self._sizes, self.device)
        self.block_sizes = self.topology.block_sizes
        self._worker_compressor = self.compressor.for_stream(self.comm.rank)
        rule = topology_cls.update_rule
        self._update: Callable[[torch.Tensor], None] = {
            "ef": self._ef_step, "sgd": self._sgd_step, "signum": self._signum_step}[rule]

        zeros = lambda: torch.zeros(self.numel, dtype=torch.float32, device=self.device)  # noqa: E731
        # Flat buffers allocated once: fresh 100 MB tensors every step cost more in page faults than
        # the arithmetic. _grad holds g, then d; _scratch holds signum's (1−μ)·g.
        self._grad = zeros()
        self._scratch = zeros() if rule == "signum" else None
        self._momentum = zeros() if rule in ("ef", "signum") and self._any("momentum") else None
        self._wd_buffer = zeros() if rule in ("ef", "signum") and self._any("weight_decay") else None
        self._worker_memory = ErrorMemory(self.numel, self.device) if rule == "ef" else None
        self._prev_lrs = [0.0] * len(self.param_groups)
        self._steps = 0
        self._skipped_steps = 0
        self._seconds = {"compress": 0.0, "exchange": 0.0}
        self._passes = [0] * len(self._params)
        self._hooks = [p.register_post_accumulate_grad_hook(self._make_pass_counter(i))
                       for i, p in enumerate(self._params) if p.requires_grad]

    # --- construction helpers -----------------------------------------------------------------------
    def _validate_groups(self, rule: str) -> None:
        for i, g in enumerate(self.param_groups):
            where = f"param group {i}"
            if not g["lr"] > 0:
                raise ValueError(f"lr must be > 0 in {where}, got {g['lr']}")
            if not 0 <= g["momentum"] < 1:
                raise ValueError(f"momentum must be in [0, 1) in {where}, got {g['momentum']}")
            if g["weight_decay"] < 0:
                raise ValueError(f"weight_decay must be >= 0 in {where}, got {g['weight_decay']}")
            if rule != "sgd" and (g["dampening"] != 0 or g.get("maximize", False)):
                raise ValueError(f"dampening and maximize are not part of SPEC §1; {where} sets them")
            for p in g["params"]:
                if p.dtype != torch.float32:
                    raise ValueError(f"parameters must be float32 (the fused buffer is float32), "
                                     f"{where} has one of dtype {p.dtype}")

    def _param_names(self, named_parameters) -> List[str]:
        if named_parameters is None:
            return [f"param.{i}" for i in range(len(self._params))]
        names_by_id: Dict[int, str] = {}
        for name, p in named_parameters:
            if name in names_by_id.values():
                raise ValueError(f"named_parameters has the name {name!r} twice")
            names_by_id[id(p)] = name
        missing = [i for i, p in enumerate(self._params) if id(p) not in names_by_id]
        if missing:
            raise ValueError(f"named_parameters does not name {len(missing)} of the optimizer's parameters "
                             f"(e.g. index {missing[0]}); pass model.named_parameters() of the same model")
        return [names_by_id[id(p)] for p in self._params]

    @staticmethod
    def _bounds(sizes: List[int]) -> List[Tuple[int, int]]:
        bounds, start = [], 0
        for n in sizes:
            bounds.append((start, start + n))
            start += n
        return bounds

    def _any(self, key: str) -> bool:
        return any(g[key] != 0 for g in self.param_groups)

    def _make_pass_counter(self, index: int):
        def hook(_param):
            self._passes[index] += 1
        return hook

    def add_param_group(self, param_group: dict) -> None:
        if not getattr(self, "_building", True):
            raise ValueError("hvd_distef fuses all parameters at construction; add param groups to the "
                             "torch.optim.SGD before wrapping it")
        super().add_param_group(param_group)

    def config(self) -> dict:
        """What every rank must agree on, and what a checkpoint must match."""
        shapes = [(n, tuple(p.shape)) for n, p in zip(self._names, self._params)]
        return {
            "world_size": self.comm.size,
            "compression": self.compressor.name, "compression_options": self.compressor.config(),
            "topology": self._topology_name,
            "backward_passes_per_step": self.backward_passes_per_step,
            "parameters": hashlib.sha1(json.dumps(shapes).encode()).hexdigest(),
            "numel": self.numel, "num_params": len(self._params),
        }

    def _check_ranks_agree(self) -> None:
        mine = self.config()
        everyone = self.comm.allgather_obj(mine)
        diffs = {k for conf in everyone for k in set(conf) | set(mine) if conf.get(k) != mine.get(k)}
        if diffs:
            detail = "; ".join(f"{k}: " + ", ".join(f"rank {r}={conf.get(k)!r}" for r, conf in enumerate(everyone))
                               for k in sorted(diffs))
            raise ValueError(f"ranks disagree on the model or options ({detail})")

    # --- the step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            grad, failure = self._fused_grad(), None
        except (ValueError, RuntimeError) as exc:  # told to every rank below, instead of a hang
            grad, failure = None, exc
        if self._bad_step_on_some_rank(grad, failure):
            self._skipped_steps += 1
            return loss
        self._update(grad)
        self._prev_lrs = [g["lr"] for g in self.param_groups]
        self._steps += 1
        return loss

    def _fused_grad(self) -> torch.Tensor:
        """All gradients in one flat float32 buffer (None as zeros), averaged over backward passes."""
        passes = max(self._passes, default=0)
        self._passes = [0] * len(self._params)
        if passes > self.backward_passes_per_step:
            raise ValueError(f"gradients were accumulated over {passes} backward passes before step(), "
                             f"more than backward_passes_per_step={self.backward_passes_per_step}; raise it "
                             f"or call step() more often")
        parts = []
        for p in self._params:
            if p.grad is None:
                parts.append(torch.zeros(p.numel(), device=self.device))
            elif p.grad.is_sparse:
                raise ValueError("sparse gradients are not supported; use dense embeddings")
            else:
                parts.append(p.grad.reshape(-1))
        grad = torch.cat(parts, out=self._grad) if parts else self._grad
        if self.backward_passes_per_step > 1:
            grad.div_(self.backward_passes_per_step)
        return grad

    def _bad_step_on_some_rank(self, grad: Optional[torch.Tensor], failure: Optional[Exception]) -> bool:
        """Decided collectively, before any buffer changes, in one small allreduce per step: a rank
        whose local preparation failed makes every rank raise; a non-finite gradient on some rank
        makes every rank raise (or, under nonfinite="skip", skip the step: returns True)."""
        bad = []
        # One reduction: the sum is non-finite iff some element is (or, harmlessly, it overflows).
        if grad is not None and grad.numel() and not bool(torch.isfinite(grad.sum())):
            bad = [n for n, part in zip(self._names, grad.split(self._sizes))
                   if not bool(torch.isfinite(part).all())]
        if not self.comm.any(bool(bad) or failure is not None):
            return False
        reports = self.comm.allgather_obj((bad, None if failure is None else f"{type(failure).__name__}: {failure}"))
        failures = [f"rank {r}: {msg}" for r, (_, msg) in enumerate(reports) if msg]
        if failures:
            if failure is not None:
                raise failure
            raise HvdDistefError("step() failed on another rank before the exchange (" + "; ".join(failures) + ")")
        report = "; ".join(f"rank {r}: {', '.join(names)}" for r, (names, _) in enumerate(reports) if names)
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(f"non-finite gradient ({report}); nothing was updated. "
                                         f"Lower the lr, check the data, or pass nonfinite='skip'")
        return True

    def _ef_step(self, grad: torch.Tensor) -> None:
        """SPEC §1: worker momentum and error feedback, the topology's exchange, the update."""
        segments = lr_ratio_segments(self._group_bounds, self._prev_lrs, [g["lr"] for g in self.param_groups])
        d = self._nesterov_direction(grad)
        with self._timed("compress"):
            payloads = self._worker_memory.step(self._worker_compressor, d, segments, self.topology.shards)
        with self._timed("exchange"):
            delta = self.topology.exchange(payloads, segments)
        self._apply(delta)

    def _nesterov_direction(self, grad: torch.Tensor) -> torch.Tensor:
        """m = μ·m + g;  d = g + μ·m (nesterov) or m;  in place in ``grad``, per param group."""
        for (start, stop), group in zip(self._group_bounds, self.param_groups):
            if group["momentum"] != 0:
                _kernels.momentum_(grad[start:stop], self._momentum[start:stop], group["momentum"], group["nesterov"])
        return grad

    def _apply(self, delta: torch.Tensor, momentum_of_decay: bool = True) -> None:
        """Weight decay with its own momentum w (uncompressed), then x = x − η·u (SPEC §1):
        w = μ·w + λ·x;  u = Δ̃ + μ·w + λ·x (nesterov) or Δ̃ + w;  x = x − η·u. Without
        ``momentum_of_decay`` (signum), u = Δ̃ + λ·x."""
        for (start, stop), group in zip(self._group_bounds, self.param_groups):
            if not group["params"]:
                continue
            wd = group["weight_decay"]
            mu, nesterov = (group["momentum"], group["nesterov"]) if momentum_of_decay else (0.0, False)
            _kernels.descend_(group["params"], delta[start:stop], self._wd_buffer[start:stop] if wd != 0 else None,
                              group["lr"], mu, wd, nesterov)

    @staticmethod
    def _views(flat: torch.Tensor, start: int, params: List[torch.Tensor]) -> List[torch.Tensor]:
        views = []
        for p in params:
            views.append(flat[start:start + p.numel()].view_as(p))
            start += p.numel()
        return views

    def _signum_step(self, grad: torch.Tensor) -> None:
        """Signum with majority vote: m = μ·m + (1−μ)·g; vote = sign(Σ sign(m_i)); x = x − η·(vote + λ·x)."""
        for (start, stop), group in zip(self._group_bounds, self.param_groups):
            mu = group["momentum"]
            if mu != 0:
                m, g = self._momentum[start:stop], grad[start:stop]
                g.copy_(m.mul_(mu).add_(torch.mul(g, 1 - mu, out=self._scratch[start:stop])))
        with self._timed("compress"):
            signs = _kernels.pack_signs(grad)
        with self._timed("exchange"):
            vote = self.topology.exchange(signs)
        self._apply(vote, momentum_of_decay=False)

    def _sgd_step(self, grad: torch.Tensor) -> None:
        """Stock SGDM: the topology averages the gradient, then torch's own SGD update runs."""
        with self._timed("exchange"):
            averaged = self.topology.exchange(grad)
        for p, g in zip(self._params, self._views(averaged, 0, self._params)):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        super().step()

    # --- reporting and state --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _timed(self, what: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[what] += time.perf_counter() - start

    def comm_stats(self) -> dict:
        """Cumulative bytes this rank put on and took off the wire, the number of steps (and of skipped
        ones), and seconds spent compressing on the worker and in the exchange (communication and
        the server step)."""
        return {"bytes_sent": self.comm.bytes_sent, "bytes_received": self.comm.bytes_received,
                "steps": self._steps, "skipped_steps": self._skipped_steps,
                "compress_time_s": self._seconds["compress"], "exchange_time_s": self._seconds["exchange"]}

    def state_dict(self) -> dict:
        """torch's SGD state plus ours: momentum m_i, worker error e_i, server error ẽ where this
        rank holds it, weight-decay buffer w, previous learning rates, compressor streams."""
        state = super().state_dict()
        clone = lambda t: None if t is None else t.clone()  # noqa: E731
        state["distef"] = {
            "config": dict(self.config(), rank=self.comm.rank),
            "steps": self._steps, "skipped_steps": self._skipped_steps, "prev_lrs": list(self._prev_lrs),
            "momentum": clone(self._momentum), "weight_decay_buffer": clone(self._wd_buffer),
            "worker_error": None if self._worker_memory is None else self._worker_memory.state_dict(),
            "topology": self.topology.state_dict(),
            "worker_compressor": self._worker_compressor.state_dict(),
            "server_compressor": self.topology.compressor.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        if "distef" not in state_dict:
            raise ValueError("this is not a hvd_distef.DistributedOptimizer state dict (no 'distef' entry)")
        ours = state_dict["distef"]
        saved, mine = ours["config"], dict(self.config(), rank=self.comm.rank)
        diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {mine[k]!r}" for k in mine if saved.get(k) != mine[k]]
        if diffs:
            raise ValueError("the checkpoint comes from another configuration (" + "; ".join(diffs) + ")")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "distef"})
        for name in ("momentum", "weight_decay_buffer"):
            buf = {"momentum": self._momentum, "weight_decay_buffer": self._wd_buffer}[name]
            if (buf is None) != (ours[name] is None):
                raise ValueError(f"the checkpoint's {name} does not fit this optimizer's hyper-parameters")
            if buf is not None:
                buf.copy_(ours[name])
        if self._worker_memory is not None:
            self._worker_memory.load_state_dict(ours["worker_error"])
        self.topology.load_state_dict(ours["topology"])
        self._worker_compressor.load_state_dict(ours["worker_compressor"])
        self.topology.compressor.load_state_dict(ours["server_compressor"])
        self._steps, self._skipped_steps = ours["steps"], ours["skipped_steps"]
        self._prev_lrs = list(ours["prev_lrs"])

