"""hvd_distef: two-way compressed gradients with worker and server error feedback and Nesterov
momentum (dist-EF-BlockSGDM, Zheng, Huang & Kwok, NeurIPS 2019) for Horovod/MPI and PyTorch.

    import horovod.torch as hvd, hvd_distef
    hvd.init()
    opt = hvd_distef.DistributedOptimizer(torch.optim.SGD(...), named_parameters=model.named_parameters(),
                                          compression=hvd_distef.Compression.blocksign, topology="ps")
"""
from .amp import GradScaler
from .compressors import Compression, Compressor
from .errors import HvdDistefError, NonFiniteGradientError
from .optimizer import DistributedOptimizer
from .payload import Payload

__all__ = ["Compression", "Compressor", "DistributedOptimizer", "GradScaler", "HvdDistefError", "NonFiniteGradientError",
           "Payload"]
__version__ = "0.1.0"
