"""Models the plan knows by name: their parameter tensors (sizes, hence d and blocksign's blocks B) and
an input to time their forward and backward on. Built from ``hvd_distef.train.models`` (ResNet-50: the
torchvision architecture with the ImageNet stem, 25.6M parameters in 161 tensors)."""
from __future__ import annotations

from typing import List, Tuple

#: name -> (input shape (C, H, W), classes): the data each model is usually trained on
INPUTS = {"resnet50": ((3, 224, 224), 1000), "resnet18": ((3, 224, 224), 1000), "resnet20": ((3, 32, 32), 10),
          "lenet": ((1, 28, 28), 10), "cnn": ((3, 32, 32), 10), "mlp": ((1, 28, 28), 10),
          "wide-mlp": ((1, 28, 28), 10)}


def build(name: str):
    """(module, input shape) of a named model; a clear error for an unknown name."""
    if name not in INPUTS:
        raise ValueError(f"unknown model {name!r}; the plan knows {', '.join(sorted(INPUTS))} "
                         f"(or give --params and --compute-ms for another)")
    from ..train.models import build as build_model
    shape, classes = INPUTS[name]
    return build_model(name, shape, classes), shape


def tensor_sizes(module) -> List[int]:
    """Sizes of the trainable parameter tensors (one blocksign block each by default)."""
    return [p.numel() for p in module.parameters() if p.requires_grad]
