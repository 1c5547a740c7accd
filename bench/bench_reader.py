"""Reader throughput: decoded RGB images/s of ShardDataset vs a plain tarfile + PIL loop.

Both read the same tars in the same process (single worker, no DataLoader) and decode every
image to RGB.  The reference is the least a reader can do: iterate the tar members, read
each image member, ``PIL.Image.open(...).convert("RGB")``.  Ours also groups members into
samples, parses ``.cls``, counts corrupt samples and builds ``Sample`` tuples.

Two corpora: the shipped Fashion-MNIST sample (28x28 PNG: per-sample overhead dominates,
the worst case for the ratio) and random-texture 224x224 JPEGs (decode dominates).

    python -m bench.bench_reader [--quick]
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile

import numpy as np

from bench.common import format_table, median_time, row


def _plain_loop(paths: list[str]) -> int:
    from PIL import Image

    n = 0
    for p in paths:
        with tarfile.open(p, "r:") as tf:
            for m in tf:
                if m.isreg() and m.name.rsplit(".", 1)[-1] in ("png", "jpg"):
                    Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
                    n += 1
    return n


def _ours(paths: list[str]) -> int:
    from mlcd_train.data.reader import ShardDataset

    return sum(1 for _ in ShardDataset(paths, rank=0, world_size=1))


def _jpeg_corpus(root: str, n: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = os.path.join(root, "jpg_src", "c0")
    os.makedirs(folder, exist_ok=True)
    base = rng.integers(0, 256, size=(28, 28, 3), dtype=np.uint8)
    for i in range(n):
        img = Image.fromarray(np.roll(base, i, axis=0)).resize((224, 224), Image.BILINEAR)
        img.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
    return os.path.join(root, "jpg_src")


def _shards(src: str, out: str, shard_size: int) -> list[str]:
    from mlcd_train.data import shards
    from mlcd_train.data.reader import list_shards

    os.environ.setdefault("MLCD_QUIET", "1")
    shards.main(["--input", src, "--out", out, "--shard-size", str(shard_size), "--overwrite"])
    return list_shards(out)


def run(quick: bool = False) -> list[dict]:
    os.environ.setdefault("MLCD_QUIET", "1")
    repeats = 3 if quick else 7
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpora = [("fashion-mnist sample 28x28 png", _shards("sample", os.path.join(tmp, "fm"), 1000))]
        n_jpg = 200 if quick else 1000
        corpora.append(("224x224 jpeg", _shards(_jpeg_corpus(tmp, n_jpg), os.path.join(tmp, "jpg"), 250)))
        for name, paths in corpora:
            n_ref, n_ours = _plain_loop(paths), _ours(paths)
            assert n_ref == n_ours, (n_ref, n_ours)
            # interleave the two so that load changes on the shared machine hit both alike
            t_ours, t_ref = [], []
            for r in range(repeats):  # alternating order: the second of a pair tends to run faster
                pair = ((t_ref, _plain_loop), (t_ours, _ours))
                for times, fn in (pair if r % 2 == 0 else pair[::-1]):
                    times.append(median_time(lambda fn=fn, paths=paths: fn(paths), repeats=1, warmup=0))
            ours, ref = n_ours / float(np.median(t_ours)), n_ref / float(np.median(t_ref))
            rows.append(row("reader", f"decoded img/s, {name}", ours, ref, "tarfile+PIL loop",
                            ours / ref, ">= 0.9", note=f"1 worker, {n_ours} images, median of {repeats}"))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer images and repeats")
    args = ap.parse_args(argv)
    print(format_table(run(quick=args.quick)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
