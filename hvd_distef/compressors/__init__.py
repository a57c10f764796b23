"""Compressors by name (SPEC §2), and ``Compression``, the namespace users pick them from."""
from .base import REGISTRY, Compressor, get_compressor
from .blocksign import BlockSign, Sign
from .dense import FP16, NoCompression
from .qsgd import QSGD
from .sparse import RandomK, TopK


class Compression:
    """Compressors by the names users type, as in ``horovod.torch.Compression``.

    Pass a class for its defaults (``Compression.blocksign``) or call it for options
    (``Compression.blocksign(block_size=4096)``, ``Compression.topk(ratio=0.001)``).
    """

    none = NoCompression
    fp16 = FP16
    sign = Sign
    blocksign = BlockSign
    topk = TopK
    randomk = RandomK
    qsgd = QSGD


__all__ = ["Compression", "Compressor", "REGISTRY", "get_compressor", "BlockSign", "Sign", "FP16",
           "NoCompression", "QSGD", "RandomK", "TopK"]
