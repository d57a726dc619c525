"""Tests for secagg.data: dataset loading and the Dirichlet client partition.

MNIST, Fashion-MNIST and CIFAR-10 are exercised offline: each test writes a tiny dataset in the
real on-disk format torchvision reads (IDX files, CIFAR pickled batches) into ``tmp_path``.
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from secagg.data import dirichlet_partition, load_dataset
from secagg.errors import ConfigError, DatasetError

# Published per-channel normalization constants, written out here rather than imported so the
# tests check the values themselves and not just that the module agrees with itself.
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

N_TRAIN, N_TEST = 20, 10


def _normalized(pixels_nchw: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]):
    """What a uint8 (N, C, H, W) array should look like after loading."""
    x = torch.as_tensor(pixels_nchw.astype(np.float32) / 255.0)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x - m) / s


# --------------------------------------------------------------------------- MNIST-style (IDX)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file: magic 0x0000 08 <ndim>, then big-endian uint32 dims."""
    assert array.dtype == np.uint8
    header = struct.pack(">I", 0x0800 | array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes(order="C"))


def _write_mnist_like(root: Path, folder: str, seed: int) -> dict[str, np.ndarray]:
    """Write the four uncompressed raw files torchvision's MNIST/FashionMNIST read."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    written = {}
    for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[0, 0, 0] = 0  # known extremes to check normalization exactly
        images[0, 0, 1] = 255
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        written[f"{prefix}_x"], written[f"{prefix}_y"] = images, labels
    return written


def test_idx_writer_matches_the_real_magic_numbers(tmp_path: Path) -> None:
    _write_idx(tmp_path / "img", np.zeros((2, 28, 28), dtype=np.uint8))
    _write_idx(tmp_path / "lbl", np.zeros(2, dtype=np.uint8))
    assert (tmp_path / "img").read_bytes()[:16] == bytes.fromhex("00000803000000020000001c0000001c")
    assert (tmp_path / "lbl").read_bytes()[:8] == bytes.fromhex("0000080100000002")


@pytest.mark.parametrize(
    ("name", "folder", "mean", "std"),
    [
        ("mnist", "MNIST", MNIST_MEAN, MNIST_STD),
        ("fashion-mnist", "FashionMNIST", FASHION_MEAN, FASHION_STD),
    ],
)
def test_mnist_like_loads_from_idx_files(
    tmp_path: Path, name: str, folder: str, mean: tuple, std: tuple
) -> None:
    written = _write_mnist_like(tmp_path, folder, seed=len(folder))

    ds = load_dataset(name, tmp_path)

    assert ds.name == name
    assert ds.classes == 10
    assert ds.in_shape == (1, 28, 28)
    assert len(ds.train) == N_TRAIN and len(ds.test) == N_TEST
    for split, prefix in ((ds.train, "train"), (ds.test, "t10k")):
        assert split.x.shape == (len(split), 1, 28, 28)
        assert split.x.dtype == torch.float32
        assert split.y.dtype == torch.int64
        assert split.y.tolist() == written[f"{prefix}_y"].tolist()
        expected = _normalized(written[f"{prefix}_x"][:, None], mean, std)
        torch.testing.assert_close(split.x, expected)
    # Pixel 0 maps to -mean/std and pixel 255 to (1-mean)/std.
    assert ds.train.x[0, 0, 0, 0].item() == pytest.approx(-mean[0] / std[0], abs=1e-5)
    assert ds.train.x[0, 0, 0, 1].item() == pytest.approx((1 - mean[0]) / std[0], abs=1e-5)


def test_mnist_does_not_read_fashion_mnist_folder(tmp_path: Path) -> None:
    _write_mnist_like(tmp_path, "FashionMNIST", seed=1)
    with pytest.raises(DatasetError, match="--download"):
        load_dataset("mnist", tmp_path)


def test_mnist_missing_test_files_raises_dataset_error(tmp_path: Path) -> None:
    _write_mnist_like(tmp_path, "MNIST", seed=2)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match="--download"):
        load_dataset("mnist", tmp_path)


# --------------------------------------------------------------------------- CIFAR-10 (pickles)

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer"]
CIFAR_NAMES += ["dog", "frog", "horse", "ship", "truck"]


def _pickle(path: Path, obj: object) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def _write_cifar10(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Write cifar-10-batches-py/ with 5 train batches of 4 images and a 10-image test batch.

    Each batch is a pickled dict: "data" is uint8 (N, 3072), rows laid out as the 1024 red, then
    green, then blue values of a 32x32 image in row-major order; "labels" is a list of ints. The
    real files are Python 2 pickles whose str keys come back as str under torchvision's
    ``encoding="latin1"`` (b"data" only under ``encoding="bytes"``), so str keys are the format
    torchvision actually indexes.
    """
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    per_batch = N_TRAIN // 5
    train_x, train_y = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        _pickle(
            base / f"data_batch_{i}",
            {"batch_label": f"training batch {i} of 5", "data": data, "labels": labels},
        )
        train_x.append(data)
        train_y.extend(labels)
    test_x = rng.integers(0, 256, size=(N_TEST, 3072), dtype=np.uint8)
    test_x[0, 0] = 0  # red channel, pixel (0, 0)
    test_x[0, 2048] = 255  # blue channel, pixel (0, 0)
    test_y = rng.integers(0, 10, size=N_TEST).tolist()
    _pickle(
        base / "test_batch",
        {"batch_label": "testing batch 1 of 1", "data": test_x, "labels": test_y},
    )
    _pickle(
        base / "batches.meta",
        {"label_names": CIFAR_NAMES, "num_cases_per_batch": per_batch, "num_vis": 3072},
    )
    return {
        "train_x": np.concatenate(train_x),
        "train_y": np.asarray(train_y),
        "test_x": test_x,
        "test_y": np.asarray(test_y),
    }


@pytest.fixture
def skip_cifar_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep torchvision's file-existence checks but skip its md5 comparison.

    CIFAR10 checks every batch (``_check_integrity``) and ``batches.meta`` (``_load_meta``)
    against the md5 of the real 50,000-image files through ``cifar.check_integrity``; our tiny
    files cannot match those checksums although their format is the real one.
    """
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def test_cifar10_loads_from_pickled_batches(tmp_path: Path, skip_cifar_md5: None) -> None:
    written = _write_cifar10(tmp_path)

    ds = load_dataset("cifar10", tmp_path)

    assert ds.name == "cifar10"
    assert ds.classes == 10
    assert ds.in_shape == (3, 32, 32)
    assert len(ds.train) == N_TRAIN and len(ds.test) == N_TEST
    for split, prefix in ((ds.train, "train"), (ds.test, "test")):
        assert split.x.shape == (len(split), 3, 32, 32)
        assert split.x.dtype == torch.float32
        assert split.x.is_contiguous()
        assert split.y.dtype == torch.int64
        # Train labels are batches 1..5 in order.
        assert split.y.tolist() == written[f"{prefix}_y"].tolist()
        # Channel-first rows must come back as (C, H, W) with per-channel normalization.
        expected = _normalized(written[f"{prefix}_x"].reshape(-1, 3, 32, 32), CIFAR_MEAN, CIFAR_STD)
        torch.testing.assert_close(split.x, expected)
    red, blue = ds.test.x[0, 0, 0, 0].item(), ds.test.x[0, 2, 0, 0].item()
    assert red == pytest.approx(-CIFAR_MEAN[0] / CIFAR_STD[0], abs=1e-5)
    assert blue == pytest.approx((1 - CIFAR_MEAN[2]) / CIFAR_STD[2], abs=1e-5)


def test_cifar10_missing_batch_raises_dataset_error(tmp_path: Path, skip_cifar_md5: None) -> None:
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="--download"):
        load_dataset("cifar10", tmp_path)


# --------------------------------------------------------------------------- missing / unknown


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_missing_dataset_raises_dataset_error_mentioning_download(
    tmp_path: Path, name: str
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="--download") as info:
        load_dataset(name, empty)
    assert str(empty) in str(info.value)
    assert not any(empty.iterdir()), "loading without download must not write anything"


def test_unknown_dataset_name_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_dataset("imagenet", tmp_path)


@pytest.mark.parametrize("content", [b"", b"garbage!"])
def test_corrupt_mnist_file_raises_dataset_error(tmp_path: Path, content: bytes) -> None:
    _write_mnist_like(tmp_path, "MNIST", seed=3)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(content)
    with pytest.raises(DatasetError, match="damaged or unreadable"):
        load_dataset("mnist", tmp_path)


def test_truncated_cifar_batch_raises_dataset_error(tmp_path: Path, skip_cifar_md5: None) -> None:
    _write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(DatasetError):
        load_dataset("cifar10", tmp_path)


# --------------------------------------------------------------------------- digits


@pytest.mark.parametrize(("name", "shape"), [("digits", (1, 8, 8)), ("digits32", (3, 32, 32))])
def test_digits_shapes_sizes_and_fixed_test_split(name: str, shape: tuple) -> None:
    first = load_dataset(name)
    second = load_dataset(name)

    assert first.name == name
    assert first.classes == 10
    assert first.in_shape == shape
    assert len(first.train) == 1437 and len(first.test) == 360
    for split in (first.train, first.test):
        assert split.x.shape == (len(split), *shape)
        assert split.x.dtype == torch.float32
        assert split.y.dtype == torch.int64
        assert split.x.min().item() >= -1.0 - 1e-6
        assert split.x.max().item() <= 1.0 + 1e-6
    assert set(first.test.y.tolist()) == set(range(10))
    assert torch.equal(first.test.x, second.test.x)
    assert torch.equal(first.test.y, second.test.y)
    assert torch.equal(first.train.y, second.train.y)


def test_digits32_channels_are_copies() -> None:
    ds = load_dataset("digits32")
    assert torch.equal(ds.test.x[:, 0], ds.test.x[:, 1])
    assert torch.equal(ds.test.x[:, 0], ds.test.x[:, 2])


# --------------------------------------------------------------------------- dirichlet_partition

CLASSES, PER_CLASS = 10, 200
LABELS = np.repeat(np.arange(CLASSES), PER_CLASS)  # 2000 samples, balanced
GLOBAL = np.full(CLASSES, 1 / CLASSES)


def _class_mix(shard: np.ndarray) -> np.ndarray:
    counts = np.bincount(LABELS[shard], minlength=CLASSES)
    return counts / counts.sum()


def _total_variation(shards: list[np.ndarray]) -> np.ndarray:
    """Per client, total-variation distance between its class mix and the global one."""
    return np.array([0.5 * np.abs(_class_mix(s) - GLOBAL).sum() for s in shards])


@pytest.mark.parametrize("alpha", [0.1, 1.0, 1000.0])
def test_partition_covers_every_index_once_and_respects_min_size(alpha: float) -> None:
    shards = dirichlet_partition(LABELS, clients=8, alpha=alpha, seed=3, min_size=40)

    assert len(shards) == 8
    merged = np.concatenate(shards)
    assert merged.dtype == np.int64
    assert np.array_equal(np.sort(merged), np.arange(len(LABELS)))  # each index exactly once
    for shard in shards:
        assert len(shard) >= 40
        assert np.array_equal(shard, np.sort(shard))


def test_partition_accepts_torch_labels() -> None:
    shards = dirichlet_partition(torch.as_tensor(LABELS), clients=4, alpha=0.5, seed=0)
    assert sorted(np.concatenate(shards).tolist()) == list(range(len(LABELS)))


def test_partition_is_reproducible_per_seed() -> None:
    a = dirichlet_partition(LABELS, clients=5, alpha=0.5, seed=7)
    b = dirichlet_partition(LABELS, clients=5, alpha=0.5, seed=7)
    c = dirichlet_partition(LABELS, clients=5, alpha=0.5, seed=8)

    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_large_alpha_gives_near_iid_clients() -> None:
    for seed in range(3):
        shards = dirichlet_partition(LABELS, clients=5, alpha=1000.0, seed=seed)
        sizes = np.array([len(s) for s in shards])
        assert np.all(np.abs(sizes - len(LABELS) / 5) <= 0.05 * len(LABELS) / 5)
        for shard in shards:
            mix = _class_mix(shard)
            assert np.all(np.abs(mix - GLOBAL) < 0.02), mix
        assert _total_variation(shards).max() < 0.05


def test_small_alpha_gives_skewed_clients() -> None:
    for seed in range(3):
        skewed = dirichlet_partition(LABELS, clients=5, alpha=0.1, seed=seed)
        iid = dirichlet_partition(LABELS, clients=5, alpha=1000.0, seed=seed)
        tv = _total_variation(skewed)
        assert tv.mean() > 0.4, tv
        assert tv.mean() > 10 * _total_variation(iid).mean()
        # A skewed client is dominated by few classes: its top class holds a large share.
        assert max(_class_mix(s).max() for s in skewed) > 0.5


def test_too_few_samples_for_min_size_lowers_it_and_says_so() -> None:
    labels = np.arange(99) % 10
    with pytest.warns(UserWarning, match="each gets at least 9, not min_client_samples=10"):
        shards = dirichlet_partition(labels, clients=10, alpha=1.0, seed=0, min_size=10)
    assert min(len(s) for s in shards) >= 9
    assert sorted(np.concatenate(shards).tolist()) == list(range(99))


def test_more_clients_than_samples_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="use fewer clients"):
        dirichlet_partition(np.arange(50) % 10, clients=51, alpha=1.0, seed=0)


def test_unsatisfiable_draws_are_topped_up_and_said() -> None:
    # 30 samples of one class over 3 clients with min 10 needs an exact 10/10/10 split, which
    # Dir(0.01) (almost always all-or-nothing) practically never draws: the smallest shards
    # are topped up from the largest, with a warning, rather than failing the job.
    labels = np.zeros(30, dtype=np.int64)
    with pytest.warns(UserWarning, match="topped up from the largest"):
        shards = dirichlet_partition(labels, clients=3, alpha=0.01, seed=0, min_size=10)
    assert [len(s) for s in shards] == [10, 10, 10]
    assert sorted(np.concatenate(shards).tolist()) == list(range(30))


def test_a_thousand_clients_on_digits_each_get_an_example() -> None:
    from secagg.data import load_dataset

    labels = load_dataset("digits").train.y.numpy()
    with pytest.warns(UserWarning, match="1000 clients share 1437 training samples"):
        shards = dirichlet_partition(labels, clients=1000, alpha=1.0, seed=0)
    assert len(shards) == 1000 and min(len(s) for s in shards) >= 1
    assert sorted(np.concatenate(shards).tolist()) == list(range(len(labels)))
