"""Small shard corpora for tests (any test may use these).

    from tests.fixtures import make_sample_shards, make_random_shards

    shard_dir = make_sample_shards(tmp_path, n=200, shard_size=50)   # Fashion-MNIST subset
    shard_dir = make_random_shards(tmp_path, n=64, size=32, num_classes=4, shard_size=16)

Both run the real ``mlcd shards`` (``mlcd_train.data.shards.main``) and return the shard
folder (``pathlib.Path``) holding ``shard-000000.tar`` ..., ``sizes.json``, ``skipped.json``
and ``classes.json``.  Read it with ``mlcd_train.data.reader.ShardDataset(shard_dir)``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np


def _run_shards(args: list[str]) -> None:
    from mlcd_train.data import shards

    rc = shards.main(args)
    assert rc == 0, f"mlcd shards {' '.join(args)} returned {rc}"


def make_sample_shards(tmp_dir, split: str = "train", n: int | None = None, shard_size: int = 100,
                       order: str = "sorted", name: str | None = None) -> Path:
    """Shards of the shipped Fashion-MNIST sample (``split`` "train": 3000 images, "test": 1000).

    ``n``: only the first n images (classes are mixed in IDX order).  Returns the shard folder
    ``tmp_dir/<name or f'shards_{split}_{n}'>``.  28x28 grey images stored as PNG, classes 0-9."""
    from mlcd_train.data.sample import SAMPLE_DIR, sample_paths
    from mlcd_train.data.shards import idx_bytes, read_idx

    tmp_dir = Path(tmp_dir)
    out = tmp_dir / (name or f"shards_{split}_{n if n is not None else 'all'}")
    src = f"sample:{split}"
    if n is not None:
        images_path, labels_path = sample_paths(split)
        src_dir = tmp_dir / f"idx_{split}_{n}"
        src_dir.mkdir(parents=True, exist_ok=True)
        (src_dir / "sub-images-idx3-ubyte.gz").write_bytes(idx_bytes(read_idx(images_path)[:n]))
        (src_dir / "sub-labels-idx1-ubyte.gz").write_bytes(idx_bytes(read_idx(labels_path)[:n]))
        shutil.copy(SAMPLE_DIR / "classes.json", src_dir / "classes.json")
        src = str(src_dir / "sub-images-idx3-ubyte.gz")
    _run_shards(["--input", src, "--out", str(out), "--shard-size", str(shard_size), "--order", order,
                 "--overwrite"])
    return out


def make_image_folder(root, n: int = 24, size: int = 32, num_classes: int = 3, seed: int = 0,
                      fmt: str = "png") -> Path:
    """An image folder ``root/class_<c>/img_<i>.<fmt>`` of random RGB images (i cycles over classes)."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(n):
        c = i % num_classes
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(d / f"img_{i:05d}.{fmt}")
    return root


def make_random_shards(tmp_dir, n: int = 64, size: int = 32, num_classes: int = 4, shard_size: int = 16,
                       seed: int = 0, name: str = "random_shards") -> Path:
    """Shards of ``n`` random ``size`` x ``size`` RGB PNG images in ``num_classes`` classes."""
    tmp_dir = Path(tmp_dir)
    folder = make_image_folder(tmp_dir / f"{name}_src", n=n, size=size, num_classes=num_classes, seed=seed)
    out = tmp_dir / name
    _run_shards(["--input", str(folder), "--out", str(out), "--shard-size", str(shard_size), "--overwrite"])
    return out
