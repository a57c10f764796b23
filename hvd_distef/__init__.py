"""hvd_distef: two-way compressed gradients with worker and server error feedback and Nesterov
momentum (dist-EF-BlockSGDM, Zheng, Huang & Kwok, NeurIPS 2019) for Horovod/MPI and PyTorch.

    import horovod.torch as hvd, hvd_distef
    hvd.init()
    opt = hvd_distef.DistributedOptimizer(torch.optim.SGD(...), named_parameters=model.named_parameters(),
                                          compression=hvd_distef.Compression.blocksign, topology="ps")
"""
from . import comm

comm.initialize_mpi()  # before hvd.init(): MPI must be mpi4py's to finalize, not Horovod's (comm.py)

from .amp import GradScaler  # noqa: E402
from .comm import set_abort_on_exception  # noqa: E402
from .compressors import Compression, Compressor  # noqa: E402
from .errors import HvdDistefError, NonFiniteGradientError  # noqa: E402
from .optimizer import DistributedOptimizer  # noqa: E402
from .payload import Payload  # noqa: E402

__all__ = ["Compression", "Compressor", "DistributedOptimizer", "GradScaler", "HvdDistefError", "NonFiniteGradientError",
           "Payload", "set_abort_on_exception"]
__version__ = "0.1.0"
