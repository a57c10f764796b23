"""Models for the training runs, by name: MLPs (``mlp``: one hidden layer of 128; ``wide-mlp``: two
of 2048, 5.8M parameters on 28x28 images), a small CNN for small images, LeNet-5 for 28x28 digits
(the experiments' quick scale), and ResNets
(ResNet-20 for CIFAR as in He et al. 2016, ResNet-18/50 with a CIFAR stem for small inputs)."""
from __future__ import annotations

import math
from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import nn

Shape = Tuple[int, int, int]


def mlp(in_shape: Shape, num_classes: int, hidden: Sequence[int] = (128,)) -> nn.Module:
    """Fully connected layers of widths ``hidden`` with ReLU between them, on the flattened image."""
    layers, width = [nn.Flatten()], math.prod(in_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


def cnn(in_shape: Shape, num_classes: int) -> nn.Module:
    c, h, w = in_shape
    return nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * (h // 2) * (w // 2), 128), nn.ReLU(), nn.Linear(128, num_classes))


def lenet(in_shape: Shape, num_classes: int) -> nn.Module:
    """LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling: two 5x5 convolutions (6 and 16 maps, the
    first zero-padded by 2 so that 28x28 MNIST sees the original 32x32 geometry), then 120, 84 and
    ``num_classes`` units; 61,706 parameters in 10 tensors of four kinds (convolution and linear
    weights, their biases) on 28x28 images. Inputs need at least 16 pixels a side."""
    c, h, w = in_shape
    if min(h, w) < 16:
        raise ValueError(f"lenet needs images of at least 16x16 pixels, got {h}x{w}; use --model cnn or mlp")
    size = lambda n: ((n // 2) - 4) // 2  # noqa: E731 - conv(pad 2), pool, conv(5), pool
    return nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * size(h) * size(w), 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut = _shortcut(cin, width, stride)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """Stages of residual blocks; a 3x3 stem for inputs up to 64 pixels, else the ImageNet stem."""

    def __init__(self, block, layers: Sequence[int], widths: Sequence[int], in_shape: Shape, num_classes: int):
        super().__init__()
        c, h, _ = in_shape
        if h <= 64:
            self.stem = nn.Sequential(nn.Conv2d(c, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        else:
            self.stem = nn.Sequential(nn.Conv2d(c, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]),
                                      nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], widths[0]
        for i, (n, width) in enumerate(zip(layers, widths)):
            for j in range(n):
                stages.append(block(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * block.expansion
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


MODELS: Dict[str, Callable[[Shape, int], nn.Module]] = {
    "mlp": mlp,
    "wide-mlp": lambda s, k: mlp(s, k, (2048, 2048)),
    "cnn": cnn,
    "lenet": lenet,
    "resnet20": lambda s, k: ResNet(BasicBlock, [3, 3, 3], [16, 32, 64], s, k),
    "resnet18": lambda s, k: ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], s, k),
    "resnet50": lambda s, k: ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], s, k),
}


def build(name: str, in_shape: Shape, num_classes: int) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](in_shape, num_classes)
