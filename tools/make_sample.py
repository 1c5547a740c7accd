"""Build the shipped Fashion-MNIST sample (mlcd_train/data/sample/) from the full set.

    apt-get install dataset-fashion-mnist
    python tools/make_sample.py [--train-per-class 300] [--test-per-class 100] [--seed 0]

Picks a class-balanced, seeded subset of the Debian package's IDX files (kept in their
original order) and writes it as IDX ``.gz`` files (gzip mtime 0, so the output is
byte-identical from run to run), plus ``classes.json`` and the MIT licence notice.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlcd_core.args import nonneg_int, positive_int  # noqa: E402
from mlcd_core.errors import MLCDError  # noqa: E402
from mlcd_core.io import check_out_separate  # noqa: E402
from mlcd_train.data import sample as S  # noqa: E402
from mlcd_train.data.sample import CLASS_NAMES, SAMPLE_DIR  # noqa: E402
from mlcd_train.data.shards import idx_bytes, read_idx  # noqa: E402
from mlcd_train.utils.io import atomic_save_json, atomic_write_bytes, atomic_write_text  # noqa: E402

LICENSE = """Fashion-MNIST sample
====================

The files train-*-idx*-ubyte.gz and t10k-*-idx*-ubyte.gz in this folder are a
class-balanced subset (built by tools/make_sample.py) of Fashion-MNIST,
https://github.com/zalandoresearch/fashion-mnist (Debian package dataset-fashion-mnist).

The MIT License (MIT)

Copyright (c) 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.

Reference: Han Xiao, Kashif Rasul, Roland Vollgraf. Fashion-MNIST: a Novel Image
Dataset for Benchmarking Machine Learning Algorithms. arXiv:1708.07747.
"""


def balanced_subset(labels: np.ndarray, per_class: int, seed: int, source: str = "labels") -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = []
    for c in range(len(CLASS_NAMES)):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise MLCDError(f"{source}: class {c} has only {len(idx)} images, asked for {per_class} per class")
        picks.append(rng.choice(idx, size=per_class, replace=False))
    return np.sort(np.concatenate(picks))


def main(argv=None) -> int:
    """The command; bad input is one line naming the file or option, exit status 2."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-per-class", type=positive_int, default=300)
    ap.add_argument("--test-per-class", type=positive_int, default=100)
    ap.add_argument("--seed", type=nonneg_int, default=0)
    ap.add_argument("--out", default=str(SAMPLE_DIR))
    args = ap.parse_args(argv)
    try:
        return make(args)
    except MLCDError as exc:
        print(f"make_sample: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # --out not writable, a file in its way, a full disk
        print(f"make_sample: error: {exc.filename or args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2


def make(args) -> int:
    out = Path(args.out)
    paths = {split: S.fashion_mnist_full_paths(split) for split in ("train", "test")}
    # the sample's files have the full set's names: an --out that is the full set's folder
    # would replace the set it is drawn from
    check_out_separate("--out", out, [("the full Fashion-MNIST", p) for pair in paths.values() for p in pair])
    for split, per_class, prefix in (("train", args.train_per_class, "train"), ("test", args.test_per_class, "t10k")):
        images_path, labels_path = paths[split]
        images, labels = read_idx(images_path), read_idx(labels_path)
        if labels.ndim != 1 or images.ndim != 3 or len(images) != len(labels):
            raise MLCDError(f"{labels_path}: {labels.shape} labels do not match the {images.shape} images of "
                            f"{images_path}")
        keep = balanced_subset(labels, per_class, args.seed, str(labels_path))
        atomic_write_bytes(out / f"{prefix}-images-idx3-ubyte.gz", idx_bytes(images[keep]))
        atomic_write_bytes(out / f"{prefix}-labels-idx1-ubyte.gz", idx_bytes(labels[keep]))
        print(f"{split}: {len(keep)} images ({per_class} per class) -> {out}")
    atomic_save_json(out / "classes.json", {str(i): n for i, n in enumerate(CLASS_NAMES)})
    atomic_write_text(out / "LICENSE", LICENSE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
