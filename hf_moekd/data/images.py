"""Image datasets that ship with a dependency or a Debian package: scikit-learn digits and Fashion-MNIST.

Both return a `datasets.DatasetDict` with `train` and `test` splits of `pixel_values` ([1, H, W] float32 in
[0, 1]) and `labels`, in torch format, ready for the Trainer and for the image models of this package.
"""
from __future__ import annotations

import contextlib
import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Callable, Iterator

import datasets
import numpy as np
import torch
import torch.nn.functional as F

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def _to_dataset(images: np.ndarray, labels: np.ndarray) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"pixel_values": images, "labels": labels.astype(np.int64)}).with_format("torch")


def _subsample(images: np.ndarray, labels: np.ndarray, n: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `n` of a fixed random permutation (all classes stay represented on balanced data)."""
    if n is None or n >= len(labels):
        return images, labels
    idx = np.random.default_rng(seed).permutation(len(labels))[:n]
    return images[idx], labels[idx]


def load_digits_splits(test_fraction: float = 0.2, seed: int = 0) -> datasets.DatasetDict:
    """scikit-learn's 1,797 8x8 digits (pixel values / 16), stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    return datasets.DatasetDict(train=_to_dataset(x_train, y_train), test=_to_dataset(x_test, y_test))


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (gzip or plain) as a uint8 array; a clear error when it is not the expected kind."""
    opener: Callable = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, OSError, zlib.error) as err:
        raise ValueError(f"{path} cannot be read ({type(err).__name__}: {err}); the file is truncated or corrupt, "
                         "reinstall dataset-fashion-mnist or replace it.") from err
    found = struct.unpack(">I", data[:4])[0] if len(data) >= 4 else None
    if found != magic:
        raise ValueError(f"{path} is not an IDX file of the expected kind (magic {found}, expected {magic}).")
    ndim = magic & 0xFF
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path} is truncated inside its header.")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {array.size} values.")
    return array.reshape(shape)


def _fashion_file(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory}. Install Debian's package "
        "(`apt-get install dataset-fashion-mnist`) or pass --data_dir to a folder with the four IDX files."
    )


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
    seed: int = 0,
) -> datasets.DatasetDict:
    """Fashion-MNIST (60,000 train / 10,000 test 28x28 images) from its IDX files, optionally subsampled."""
    directory = Path(data_dir or os.environ.get("HF_MOEKD_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    splits = {}
    for split, prefix, limit in (("train", "train", max_train_samples), ("test", "t10k", max_test_samples)):
        images = _read_idx(_fashion_file(directory, f"{prefix}-images-idx3-ubyte"), 2051)
        labels = _read_idx(_fashion_file(directory, f"{prefix}-labels-idx1-ubyte"), 2049)
        images, labels = _subsample(images, labels, limit, seed)
        splits[split] = _to_dataset((images.astype(np.float32) / 255.0)[:, None], labels)
    return datasets.DatasetDict(splits)


def load_digits(data_dir: None = None, max_train_samples: int | None = None, max_test_samples: int | None = None,
                seed: int = 0) -> datasets.DatasetDict:
    """`load_digits_splits`, optionally subsampled like `load_fashion_mnist` (`data_dir` is not used)."""
    splits = load_digits_splits()
    for split, limit in (("train", max_train_samples), ("test", max_test_samples)):
        if limit is not None and limit < len(splits[split]):
            idx = np.random.default_rng(seed).permutation(len(splits[split]))[:limit]
            splits[split] = splits[split].select(sorted(idx.tolist()))
    return splits


def load_image_folders(train_dir: str | os.PathLike, test_dir: str | os.PathLike, image_size: int = 28,
                       max_train_samples: int | None = None, max_test_samples: int | None = None,
                       seed: int = 0) -> datasets.DatasetDict:
    """Your own images, one folder per class (`datasets`' imagefolder layout: `<dir>/<label>/<image>`), or saved
    `datasets` folders with an `image` and a `label` column: converted to grayscale, resized to `image_size`,
    `pixel_values` [1, S, S] in [0, 1]. The test labels must be among the training labels (mapped by name)."""
    raw = {split: _image_split(Path(path), split) for split, path in (("train", train_dir), ("test", test_dir))}
    names = raw["train"].features["label"].names
    splits = {}
    for split, data, limit in (("train", raw["train"], max_train_samples), ("test", raw["test"], max_test_samples)):
        own = data.features["label"].names
        if unknown := sorted(set(own) - set(names)):
            raise ValueError(f"the {split} images have classes {unknown} that the training images do not have "
                             f"({', '.join(names)}); add them to the training folder or drop them")
        labels = np.array([names.index(own[i]) for i in data["label"]])
        images = np.stack([image_pixels(img, image_size) for img in data["image"]])
        images, labels = _subsample(images, labels, limit, seed)
        dataset = datasets.Dataset.from_dict(
            {"pixel_values": images, "labels": labels.astype(np.int64)},
            features=datasets.Features({"pixel_values": datasets.Array3D((1, image_size, image_size), "float32"),
                                        "labels": datasets.ClassLabel(names=list(names))}))
        splits[split] = dataset.with_format("torch")
    return datasets.DatasetDict(splits)


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """No `datasets` progress bars inside the block ("Downloading data: 1000 files" is local files being listed, and
    offline it looks like a failure); the previous setting is restored after."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def read_image_folder(path: str | os.PathLike, where: str) -> datasets.Dataset:
    """One split of images: a folder with one subfolder per class (`datasets`' imagefolder: columns `image` and a
    ClassLabel `label`) or a saved `datasets` folder (any columns). One error line naming `where` (e.g. "--train_file
    DIR") for a missing or empty folder, a folder without class subfolders and one with a single class."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{where} does not exist: pass a folder with one subfolder per class, or a saved "
                                "datasets folder")
    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        data = datasets.load_from_disk(str(path))
    elif (path / "dataset_dict.json").is_file():
        raise ValueError(f"{where} is a DatasetDict folder; point at one split's folder (e.g. {path}/train)")
    else:
        try:
            with quiet_progress():
                data = datasets.load_dataset("imagefolder", data_dir=str(path), split="train")
        except FileNotFoundError:  # datasets' EmptyDatasetError
            raise ValueError(f"{where} holds no images") from None
        if "label" not in data.column_names:
            classes = sorted(p.name for p in path.iterdir() if p.is_dir())
            what = f"a single class folder {classes[0]!r}" if len(classes) == 1 else "no class subfolders"
            raise ValueError(f"{where} has {what}: classification needs one subfolder per class, at least two")
    if len(data) == 0:
        raise ValueError(f"{where} holds no images")
    return data


def _image_split(path: Path, split: str) -> datasets.Dataset:
    if not path.is_dir():
        raise FileNotFoundError(f"image folder {path} ({split}) does not exist: pass a folder with one subfolder per "
                                "class, or a saved datasets folder")
    data = read_image_folder(path, f"{path} ({split})")
    missing = [c for c in ("image", "label") if c not in data.column_names]
    if missing or not isinstance(data.features["label"], datasets.ClassLabel):
        raise ValueError(f"{path} ({split}) needs an 'image' and a class 'label' column (found "
                         f"{', '.join(data.column_names)}): use one subfolder per class")
    return data


def image_pixels(image, size: int, channels: int = 1) -> np.ndarray:
    """A PIL image as `[channels, size, size]` float32 in [0, 1] (grayscale for 1 channel, else RGB)."""
    resized = image.convert("L" if channels == 1 else "RGB").resize((size, size))
    pixels = np.asarray(resized, dtype=np.float32) / 255.0
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


IMAGE_DATASETS: dict[str, Callable[..., datasets.DatasetDict]] = {"digits": load_digits, "fashion_mnist": load_fashion_mnist}
IMAGE_LABELS = {"digits": tuple(str(i) for i in range(10)), "fashion_mnist": FASHION_MNIST_LABELS}


def image_labels(name: str, data: datasets.DatasetDict) -> tuple[str, ...]:
    """The class names of a named image dataset, or those stored in its `labels` feature (image folders)."""
    feature = data["train"].features.get("labels")
    return IMAGE_LABELS.get(name) or tuple(feature.names)


def load_image_dataset(name: str, **kwargs) -> datasets.DatasetDict:
    """`digits` or `fashion_mnist` (kwargs: data_dir, max_train_samples, max_test_samples, seed)."""
    if name not in IMAGE_DATASETS:
        raise ValueError(f"unknown image dataset {name!r}; choose one of {sorted(IMAGE_DATASETS)}.")
    return IMAGE_DATASETS[name](**kwargs)


class InMemoryDataset(torch.utils.data.Dataset):
    """A `datasets.Dataset`'s columns as tensors: row access without Arrow decoding (much faster for small images)."""

    def __init__(self, dataset: datasets.Dataset, columns: tuple[str, ...] = ("pixel_values", "labels")) -> None:
        table = dataset.with_format("torch")[:]
        self.columns = {name: table[name] for name in columns}
        self._len = len(dataset)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: column[index] for name, column in self.columns.items()}


def rotate_images(pixel_values: torch.Tensor, degrees: float) -> torch.Tensor:
    """`[batch, channels, H, W]` images rotated by `degrees` about their centre (bilinear, zeros outside)."""
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    matrix = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=pixel_values.dtype)
    grid = F.affine_grid(matrix.expand(len(pixel_values), 2, 3), list(pixel_values.shape), align_corners=False)
    return F.grid_sample(pixel_values, grid, align_corners=False)


def shifted_test_sets(test: datasets.Dataset, rotation: float = 30.0, noise_std: float = 0.3,
                      seed: int = 0) -> dict[str, datasets.Dataset]:
    """Out-of-distribution copies of an image split: `rotated` by `rotation` degrees, and `noised` with Gaussian
    noise of std `noise_std` (fixed by `seed`, pixels clipped to [0, 1])."""
    columns = test.with_format("torch")[:]
    pixels, labels = columns["pixel_values"], columns["labels"].numpy()
    noise = noise_std * torch.randn(pixels.shape, generator=torch.Generator().manual_seed(seed))
    shifted = {"rotated": rotate_images(pixels, rotation), "noised": (pixels + noise).clamp(0.0, 1.0)}
    return {name: _to_dataset(images.numpy(), labels) for name, images in shifted.items()}
