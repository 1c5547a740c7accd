"""The shipped Fashion-MNIST sample corpus and the full Debian dataset.

The sample (package data, built by ``tools/make_sample.py``) holds 3000 training images
(300 per class) and 1000 test images (100 per class) of Fashion-MNIST as IDX ``.gz`` files,
plus ``classes.json`` and the MIT licence notice of Zalando SE (``LICENSE``).

``mlcd shards --input sample`` (train split) or ``--input sample:test`` reads it without
knowing where the package is installed; ``--input fashion-mnist[:test]`` reads the full
60000/10000 set installed by ``apt-get install dataset-fashion-mnist``.
"""
from __future__ import annotations

import json
from pathlib import Path

from mlcd_train.utils.errors import MLCDError

SAMPLE_DIR = Path(__file__).resolve().parent
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

#: the ten Fashion-MNIST classes, in label order
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _split(split: str) -> tuple[str, str]:
    if split not in _FILES:
        raise MLCDError(f"unknown split {split!r}: use 'train' or 'test'")
    return _FILES[split]


def sample_paths(split: str = "train") -> tuple[Path, Path]:
    """(images, labels) IDX ``.gz`` paths of the shipped sample's ``split`` ("train"/"test")."""
    images, labels = (SAMPLE_DIR / name for name in _split(split))
    if not images.is_file() or not labels.is_file():
        raise MLCDError(f"{images}: the shipped sample is missing from this installation "
                        "(rebuild it with tools/make_sample.py)")
    return images, labels


def fashion_mnist_full_paths(split: str = "train", root: str | Path = DEBIAN_DIR) -> tuple[Path, Path]:
    """(images, labels) of the full Fashion-MNIST set installed by the Debian package."""
    images, labels = (Path(root) / name for name in _split(split))
    if not images.is_file() or not labels.is_file():
        raise MLCDError(f"{images}: full Fashion-MNIST not found; install it with "
                        "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu)")
    return images, labels


def class_names() -> dict[int, str]:
    """{class id: name} as stored in the sample's ``classes.json``."""
    with open(SAMPLE_DIR / "classes.json", encoding="utf-8") as f:
        return {int(k): v for k, v in json.load(f).items()}
