"""Datasets and the Dirichlet label partition over clients.

``digits`` (scikit-learn's bundled 8x8 digits) needs no download and is the default;
``digits32`` is the same images resized to 3x32x32 so CIFAR-sized models can train offline.
MNIST, Fashion-MNIST and CIFAR-10 load through torchvision from ``data_dir`` in their standard
on-disk layout (``--download`` fetches them where the machine is online).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from secagg.errors import ConfigError, DatasetError

# Fixed so that every run, and every client, sees the same digits test set.
_DIGITS_SPLIT_SEED = 0
_NORMALIZE = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


#: each dataset's input shape and class count, as ``load_dataset`` gives them: what a model is
#: built for, without the data (a server checks the job's model where no data is)
SHAPES: dict[str, tuple[tuple[int, ...], int]] = {
    "digits": ((1, 8, 8), 10),
    "digits32": ((3, 32, 32), 10),
    "mnist": ((1, 28, 28), 10),
    "fashion-mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
}


@dataclass(frozen=True)
class Split:
    """Images as float32 (N, C, H, W) and labels as int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: np.ndarray) -> Split:
        index = torch.as_tensor(indices, dtype=torch.long)
        return Split(self.x[index], self.y[index])


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    test: Split
    classes: int

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


def load_dataset(name: str, data_dir: str | Path = "data", download: bool = False) -> Dataset:
    """Load a dataset by name; raise DatasetError saying how to get it when it is missing."""
    if name in ("digits", "digits32"):
        return _digits(resize=name == "digits32")
    if name in _NORMALIZE:
        return _torchvision(name, Path(data_dir), download)
    raise ConfigError(
        f"unknown dataset {name!r}; choose digits, digits32, mnist, fashion-mnist, cifar10"
    )


def _digits(resize: bool) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if resize:
        images = torch.nn.functional.interpolate(
            images, size=(32, 32), mode="bilinear", align_corners=False
        ).repeat(1, 3, 1, 1)
    images = (images - 0.5) / 0.5
    labels = torch.tensor(bunch.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=0.2,
        stratify=bunch.target,
        random_state=_DIGITS_SPLIT_SEED,
    )
    full = Split(images, labels)
    name = "digits32" if resize else "digits"
    return Dataset(name, full.subset(train_idx), full.subset(test_idx), classes=10)


def _torchvision(name: str, data_dir: Path, download: bool) -> Dataset:
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}.get(
        name, datasets.CIFAR10
    )
    splits = []
    for train in (True, False):
        try:
            raw = cls(root=str(data_dir), train=train, download=download)
        except RuntimeError as err:
            raise DatasetError(
                f"{name} not found in {data_dir}/; run again with --download where online, "
                f"or copy it there in torchvision's layout and pass --data-dir"
            ) from err
        except Exception as err:  # torchvision's readers raise anything on damaged files
            raise DatasetError(
                f"{name} in {data_dir}/ is damaged or unreadable ({type(err).__name__}: {err}); "
                "delete it and fetch it again with --download"
            ) from err
        splits.append(_to_split(name, raw.data, raw.targets))
    return Dataset(name, splits[0], splits[1], classes=10)


def _to_split(name: str, data: object, targets: object) -> Split:
    images = torch.as_tensor(np.asarray(data), dtype=torch.float32) / 255.0
    images = images.permute(0, 3, 1, 2) if images.ndim == 4 else images.unsqueeze(1)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in _NORMALIZE[name])
    return Split(((images - mean) / std).contiguous(), torch.as_tensor(np.asarray(targets)).long())


def dirichlet_partition(
    labels: np.ndarray, clients: int, alpha: float, seed: int, min_size: int = 10
) -> list[np.ndarray]:
    """Split sample indices over clients with per-class proportions drawn from Dir(alpha).

    Small alpha gives skewed label mixes; large alpha approaches an IID split. The draw is
    repeated (seeded, so reproducible) until every client has at least ``min_size`` samples.
    When there are too few samples for that (many clients: ``min_size`` is lowered to what the
    data allows, at least 1) or no draw gives it, the smallest shards are topped up with
    samples from the largest, and a warning says so: the label skew is then only approximately
    Dirichlet. Returns one sorted index array per client.
    """
    labels = np.asarray(labels)
    if clients > len(labels):
        raise ConfigError(
            f"{len(labels)} training samples cannot give each of {clients} clients one; "
            "use fewer clients"
        )
    if clients * min_size > len(labels):
        lowered = len(labels) // clients
        warnings.warn(
            f"{clients} clients share {len(labels)} training samples: each gets at least "
            f"{lowered}, not min_client_samples={min_size}",
            stacklevel=2,
        )
        min_size = lowered
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    members_of = [np.flatnonzero(labels == cls) for cls in classes]
    shards: list[list[int]] = []
    # Many clients rarely all reach the minimum by chance: fewer draws, then the top-up.
    for _ in range(1000 if clients <= 100 else 20):
        shards = [[] for _ in range(clients)]
        for members in members_of:
            members = rng.permutation(members)
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * len(members)).astype(int)
            for shard, part in zip(shards, np.split(members, cuts[:-1]), strict=True):
                shard.extend(part.tolist())
        if min(len(shard) for shard in shards) >= min_size:
            return [np.sort(np.asarray(shard, dtype=np.int64)) for shard in shards]
    warnings.warn(
        f"no Dirichlet(alpha={alpha}) draw gives each of {clients} clients {min_size} samples; "
        "the smallest shards were topped up from the largest (label skew approximate)",
        stacklevel=2,
    )
    return [np.sort(np.asarray(shard, dtype=np.int64)) for shard in _top_up(shards, min_size)]


def _top_up(shards: list[list[int]], min_size: int) -> list[list[int]]:
    """Move samples from the largest shards to those below ``min_size``, deterministically."""
    sizes = np.array([len(s) for s in shards])
    for needy in np.flatnonzero(sizes < min_size):
        while len(shards[needy]) < min_size:
            donor = int(np.argmax([len(s) for s in shards]))
            shards[needy].append(shards[donor].pop())
    return shards
