"""The one exception family of hvd_distef, so callers can catch our failures apart from torch's or MPI's."""


class HvdDistefError(RuntimeError):
    """A failure of hvd_distef: bad state, disagreeing ranks, or a wrapped MPI/Horovod error."""


class NonFiniteGradientError(HvdDistefError, FloatingPointError):
    """Some rank produced a NaN or infinite gradient; raised on every rank before any buffer changes."""


def on_every_rank(exc: BaseException) -> BaseException:
    """Mark ``exc`` as raised by every rank together (a collective decision): uncaught, it ends each rank
    by itself, with its own traceback, and needs no ``MPI_Abort`` (``comm.MPIProcess.abort_on_exception``)."""
    exc.hvd_distef_on_every_rank = True
    return exc


def raised_on_every_rank(exc: BaseException) -> bool:
    """Whether ``exc`` was marked by ``on_every_rank``."""
    return getattr(exc, "hvd_distef_on_every_rank", False)
