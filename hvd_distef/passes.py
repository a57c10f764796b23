"""horovod.torch's ``backward_passes_per_step``: the backward passes of the current step, counted once per
``backward()`` call through hooks on the fused parameters (SPEC §5a: gradients are summed over the
passes, as in torch and Horovod). Imports only torch."""
from __future__ import annotations

import weakref
from typing import Callable, Optional, Sequence

import torch


def check_passes(passes) -> int:
    """``backward_passes_per_step``: a positive integer (ValueError otherwise)."""
    if isinstance(passes, bool) or int(passes) != passes or passes < 1:
        raise ValueError(f"backward_passes_per_step must be a positive integer, got {passes!r}")
    return int(passes)


class BackwardPasses:
    """Counts the backward passes since the last step and calls ``on_final(param)`` when a gradient is
    final for the step (accumulated by the step's last allowed pass: ``overlap=True`` starts its bucket).

    A parameter whose gradient is another tensor than after its last accumulation had it reset in between
    (``model.zero_grad()``, say): the count restarts with that pass. The hooks hold this object weakly,
    so a discarded optimizer is not kept alive by its parameters.
    """

    def __init__(self, params: Sequence[torch.Tensor], allowed: int,
                 on_final: Optional[Callable[[torch.Tensor], None]] = None):
        self.allowed, self.count, self.on_final = check_passes(allowed), 0, on_final
        self._queued, self._reset = False, False
        self._seen: dict = {}  # parameter -> weak reference to its gradient after its last accumulation
        this = weakref.ref(self)

        def on_grad(param):
            passes = this()
            if passes is not None:
                passes._accumulated(param)
        handles = [p.register_post_accumulate_grad_hook(on_grad) for p in params]
        weakref.finalize(self, lambda: [h.remove() for h in handles])

    def set_allowed(self, passes: int) -> None:
        """Horovod's ``set_backward_passes_per_step``: allow ``passes`` from now on (the count restarts)."""
        self.allowed, self.count = check_passes(passes), 0

    def check(self) -> None:
        """ValueError when more passes than allowed accumulated into the gradients of this step."""
        if self.count > self.allowed:
            raise ValueError(f"gradients were accumulated over {self.count} backward passes before step(), more "
                             f"than backward_passes_per_step={self.allowed}; raise it, call step() more often, or "
                             f"zero_grad() between")

    def _accumulated(self, param: torch.Tensor) -> None:
        seen = self._seen.get(param)
        if seen is not None and seen() is not param.grad:
            self._reset = True
        self._seen[param] = weakref.ref(param.grad)
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        if self.on_final is not None and (0 if self._reset else self.count) + 1 >= self.allowed:
            self.on_final(param)  # the step's last pass: this gradient is final

    def _end_of_backward(self) -> None:
        self._queued = False
        if self._reset:
            self._reset, self.count = False, 0
        self.count += 1
