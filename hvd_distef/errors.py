"""The one exception family of hvd_distef, so callers can catch our failures apart from torch's or MPI's."""


class HvdDistefError(RuntimeError):
    """A failure of hvd_distef: bad state, disagreeing ranks, or a wrapped MPI/Horovod error."""


class NonFiniteGradientError(HvdDistefError, FloatingPointError):
    """Some rank produced a NaN or infinite gradient; raised on every rank before any buffer changes."""
