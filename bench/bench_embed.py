"""Embed throughput: ``mlcd embed --model open_clip:NAME`` vs a bare loop doing the same work.

Both build the same open_clip model from its config (no pretrained weights, the same seed,
so the same random weights: the first, untimed run checks that the two write the same rows),
read the same shards of 224x224 JPEGs, decode every image with PIL, apply open_clip's eval
preprocessing, run ``model.visual`` in batches of the same size under inference mode, and
write one L2-normalised float16 ``.npy`` plus the keys (and classes) per shard.  Each run is
the whole job, model construction included.  The reference is the least such a job can do:
``tarfile`` members grouped by key, ``PIL.Image.open(...).convert("RGB")``, the transform,
``torch.stack``, the model, ``np.save``.  ``mlcd embed`` also checks its inputs and every row
(NaN, zero vectors), writes files atomically, keeps meta.json and resumable state.

CPU (the figure in README.md): one process, one torch thread, no DataLoader workers on either
side (decoding and the model share the core alike), ``ViT-S-32``'s image tower (width 384, 12 layers,
patch 32) with a one-layer text tower, so that building the model does not dominate a short
run.  Runs alternate in order after an untimed warm-up of both; medians of several runs; the
note adds the ratio of process CPU times (robust to other jobs taking the core away).

``--gpu`` (only where CUDA is present): ViT-B-16 and ViT-L-14, ``mlcd embed --workers W``
against the bare loop fed by a DataLoader with the same W workers, bf16 autocast and
channels_last; plus, for information, the bare loop decoding on the GPU
(``torchvision.io.decode_jpeg(device="cuda")``, resize/crop/normalise on the GPU).

    python -m bench.bench_embed [--quick] [--repeats N] [--model NAME|CONFIG.json] [--gpu]
"""
from __future__ import annotations

import json
import os
import statistics
import tarfile
import tempfile
import time

import numpy as np
import torch

from bench.common import cli, row

# ViT-S-32's image tower (open_clip's registry config) with a token text tower: the text
# tower is built and thrown away by both sides, and the full one takes seconds to initialise
BENCH_S32 = {
    "embed_dim": 384,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 384, "patch_size": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
IMAGE_EXT = ("jpg", "jpeg", "png", "webp")


def _model_name(model: str) -> str:
    """Register a config .json with open_clip (as ``mlcd embed`` does) and return its name."""
    import open_clip

    if model.endswith(".json"):
        open_clip.add_model_config(model)
        return os.path.splitext(os.path.basename(model))[0]
    return model


def _build(model: str, device: str, channels_last: bool = False):
    import open_clip
    import torch

    torch.manual_seed(0)  # the same random weights as ours (seeded the same way before main)
    m, _, preprocess = open_clip.create_model_and_transforms(_model_name(model), pretrained=None)
    visual = m.visual.eval().to(device)
    if channels_last:
        visual = visual.to(memory_format=torch.channels_last)
    return visual, preprocess


def _samples(path: str):
    """(key, image bytes, class or -1) of one tar, in member order."""
    with tarfile.open(path, "r:") as tf:
        key, img, cls = None, None, -1
        for m in tf:
            if not m.isreg():
                continue
            k, _, ext = m.name.rpartition(".")
            if k != key:
                if img is not None:
                    yield key, img, cls
                key, img, cls = k, None, -1
            if ext.lower() in IMAGE_EXT:
                img = tf.extractfile(m).read()
            elif ext == "cls":
                cls = int(tf.extractfile(m).read())
        if img is not None:
            yield key, img, cls


class _ShardBatches(torch.utils.data.IterableDataset):
    """Batches of one shard at a time (never across two), decoded and transformed; shards
    split over DataLoader workers.  Yields (shard index, keys, pixels, classes, last)."""

    def __init__(self, paths, transform, batch_size):
        self.paths, self.transform, self.batch_size = paths, transform, batch_size

    def __iter__(self):
        import io

        import torch
        from PIL import Image

        info = torch.utils.data.get_worker_info()
        mine = range(len(self.paths)) if info is None else range(info.id, len(self.paths), info.num_workers)
        for i in mine:
            keys, pix, cls = [], [], []
            for key, data, c in _samples(self.paths[i]):
                keys.append(key)
                pix.append(self.transform(Image.open(io.BytesIO(data)).convert("RGB")))
                cls.append(c)
                if len(keys) == self.batch_size:
                    yield i, keys, torch.stack(pix), cls, False
                    keys, pix, cls = [], [], []
            yield i, keys, torch.stack(pix) if pix else None, cls, True


def _write(out: str, path: str, rows: list, keys: list, cls: list) -> None:
    name = os.path.basename(path)[: -len(".tar")]
    np.save(os.path.join(out, f"{name}.npy"), np.concatenate(rows) if rows else np.zeros((0, 1), np.float16))
    if any(c >= 0 for c in cls):
        np.save(os.path.join(out, f"{name}.cls.npy"), np.asarray(cls, dtype=np.int32))
    np.save(os.path.join(out, f"{name}.keys.npy"), np.asarray(keys, dtype=np.str_))


def reference(paths: list[str], out: str, model: str, batch_size: int, device: str = "cpu",
              workers: int = 0) -> int:
    """The bare loop; returns the number of images embedded."""
    import contextlib

    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    cuda = device.startswith("cuda")
    visual, preprocess = _build(model, device, channels_last=cuda)
    loader = DataLoader(_ShardBatches(paths, preprocess, batch_size), batch_size=None, num_workers=workers,
                        pin_memory=cuda)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    acc: dict = {}
    n = 0
    os.makedirs(out, exist_ok=True)
    for i, keys, pix, cls, last in loader:
        rows, k, c = acc.setdefault(i, ([], [], []))
        if pix is not None:
            x = pix.to(device, non_blocking=True)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), amp:
                e = visual(x)
            rows.append(F.normalize(e.float(), dim=1).half().cpu().numpy())
            k += keys
            c += cls
            n += len(keys)
        if last:
            _write(out, paths[i], *acc.pop(i))
    return n


def reference_gpu_decode(paths: list[str], out: str, model: str, batch_size: int, device: str = "cuda") -> int:
    """The bare loop with JPEG decoding and preprocessing on the GPU (nvjpeg); for information."""
    import torch
    import torch.nn.functional as F
    import torchvision.transforms.v2.functional as TF
    from torchvision.io import ImageReadMode, decode_jpeg

    visual, _ = _build(model, device, channels_last=True)
    size = visual.image_size[0] if isinstance(visual.image_size, tuple) else int(visual.image_size)
    mean = torch.tensor(visual.image_mean or (0.48145466, 0.4578275, 0.40821073), device=device).view(1, 3, 1, 1)
    std = torch.tensor(visual.image_std or (0.26862954, 0.26130258, 0.27577711), device=device).view(1, 3, 1, 1)
    os.makedirs(out, exist_ok=True)
    n = 0
    for path in paths:
        samples = list(_samples(path))
        rows = []
        for s in range(0, len(samples), batch_size):
            chunk = samples[s: s + batch_size]
            data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for _, b, _ in chunk]
            imgs = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            imgs = [TF.center_crop(TF.resize(im, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True),
                                   [size, size]) for im in imgs]
            x = ((torch.stack(imgs).float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                e = visual(x)
            rows.append(F.normalize(e.float(), dim=1).half().cpu().numpy())
            n += len(chunk)
        _write(out, path, rows, [k for k, _, _ in samples], [c for _, _, c in samples])
    return n


def ours(shards: str, out: str, model: str, batch_size: int, device: str = "cpu", workers: int = 0) -> int:
    import torch

    from clustering import embed

    torch.manual_seed(0)  # the reference builds its model after the same seed
    rc = embed.main(["--shards", shards, "--out", out, "--model", f"open_clip:{model}", "--batch-size",
                     str(batch_size), "--workers", str(workers), "--device", device, "--overwrite"])
    assert rc == 0, rc
    return int(json.load(open(os.path.join(out, "meta.json")))["total"])


def _same_rows(a: str, b: str, names: list[str]) -> None:
    """The two outputs hold the same keys and (to fp16/bf16 rounding) the same rows."""
    for name in names:
        ka, kb = np.load(os.path.join(a, f"{name}.keys.npy")), np.load(os.path.join(b, f"{name}.keys.npy"))
        assert (ka == kb).all(), name
        xa = np.load(os.path.join(a, f"{name}.npy")).astype(np.float32)
        xb = np.load(os.path.join(b, f"{name}.npy")).astype(np.float32)
        assert xa.shape == xb.shape and xa.dtype == xb.dtype, (name, xa.shape, xb.shape)
        cos = (xa * xb).sum(1)
        assert cos.min() > 0.99, (name, float(cos.min()))


def _corpus(tmp: str, n: int, shard_size: int) -> tuple[str, list[str]]:
    from bench.bench_reader import _jpeg_corpus, _shards

    paths = _shards(_jpeg_corpus(tmp, n), os.path.join(tmp, "shards"), shard_size)
    return os.path.join(tmp, "shards"), paths


def _paired(jobs: dict, repeats: int, n: int) -> dict:
    """(median, min, max wall seconds, median CPU seconds of this process) of each job: an
    untimed warm-up of every job, then ``repeats`` rounds whose order alternates (the second
    of a pair tends to run faster).  Every run must embed ``n`` images."""
    times: dict = {name: [] for name in jobs}
    cpu: dict = {name: [] for name in jobs}
    order = list(jobs)
    for r in range(-1, repeats):  # round -1: the warm-up
        for name in (order if r % 2 == 0 else order[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            got = jobs[name]()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            assert got == n, (name, got, n)
            if r >= 0:
                times[name].append(dt)
                cpu[name].append(dc)
    return {name: (statistics.median(t), min(t), max(t), statistics.median(cpu[name])) for name, t in times.items()}


def _cpu_rows(tmp: str, quick: bool, repeats: int, model: str | None) -> list[dict]:
    import torch

    n = 96 if quick else 384
    batch = 32
    shard_dir, paths = _corpus(tmp, n, 96)
    if model is None:
        model = os.path.join(tmp, "bench-vit-s32.json")
        with open(model, "w") as f:
            json.dump(BENCH_S32, f)
    names = [os.path.basename(p)[: -len(".tar")] for p in paths]
    out_ours, out_ref = os.path.join(tmp, "emb_ours"), os.path.join(tmp, "emb_ref")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core each: a shared 2-core machine preempts a second thread at random
    try:
        t = _paired({"ours": lambda: ours(shard_dir, out_ours, model, batch),
                     "ref": lambda: reference(paths, out_ref, model, batch)}, repeats, n)
    finally:
        torch.set_num_threads(threads)
    _same_rows(out_ours, out_ref, names)
    r_ours, r_ref = n / t["ours"][0], n / t["ref"][0]
    label = os.path.splitext(os.path.basename(model))[0]
    return [row("embed", f"img/s, open_clip {label}, CPU, 1 thread", r_ours, r_ref,
                "tarfile+PIL+open_clip loop", r_ours / r_ref, ">= 0.95",
                note=f"{n} 224px JPEGs in {len(paths)} shards, batch {batch}, 0 workers, median of {repeats}; "
                     f"wall ours {t['ours'][1]:.1f}-{t['ours'][2]:.1f}s, ref {t['ref'][1]:.1f}-{t['ref'][2]:.1f}s; "
                     f"CPU-time ratio {t['ref'][3] / t['ours'][3]:.3f}")]


def _gpu_rows(tmp: str, quick: bool, repeats: int) -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        return [row("embed", "img/s, GPU", None, None, "", None, note="skipped: no CUDA device")]
    workers = min(8, os.cpu_count() or 1)
    n = 2048 if quick else 8192
    shard_dir, paths = _corpus(os.path.join(tmp, "gpu"), n, 512)
    names = [os.path.basename(p)[: -len(".tar")] for p in paths]
    rows = []
    for model, batch in (("ViT-B-16", 256), ("ViT-L-14", 128)):
        outs = {k: os.path.join(tmp, f"gpu_{model}_{k}") for k in ("ours", "ref", "nvjpeg")}
        jobs = {"ours": lambda m=model, b=batch, o=outs["ours"]: ours(shard_dir, o, m, b, "cuda", workers),
                "ref": lambda m=model, b=batch, o=outs["ref"]: reference(paths, o, m, b, "cuda", workers),
                "nvjpeg": lambda m=model, b=batch, o=outs["nvjpeg"]: reference_gpu_decode(paths, o, m, b)}
        t = _paired(jobs, repeats, n)
        _same_rows(outs["ours"], outs["ref"], names)
        r = {k: n / v[0] for k, v in t.items()}
        note = f"{n} 224px JPEGs, batch {batch}, {workers} workers, bf16, median of {repeats}"
        rows.append(row("embed", f"img/s, open_clip {model}, {torch.cuda.get_device_name()}", r["ours"], r["ref"],
                        "tarfile+PIL loop, DataLoader workers, channels_last", r["ours"] / r["ref"], ">= 0.95",
                        note=note))
        rows.append(row("embed", f"img/s, open_clip {model}, GPU JPEG decode", r["ours"], r["nvjpeg"],
                        "decode_jpeg(device='cuda') loop", r["ours"] / r["nvjpeg"], None, note=note))
    return rows


def run(quick: bool = False, repeats: int | None = None, model: str | None = None, gpu: bool = False) -> list[dict]:
    os.environ.setdefault("MLCD_QUIET", "1")
    repeats = repeats or (3 if quick else 5)
    with tempfile.TemporaryDirectory() as tmp:
        rows = _cpu_rows(tmp, quick, repeats, model)
        if gpu:
            rows += _gpu_rows(tmp, quick, repeats)
    return rows


def main(argv: list[str] | None = None) -> int:
    return cli(run, __doc__, argv=argv, options=(
        ("--model", {"default": None, "help": "open_clip registry name or config .json for the CPU run "
                                              "(default: ViT-S-32 tower)"}),
        ("--gpu", {"action": "store_true", "help": "also ViT-B-16 and ViT-L-14 on CUDA"})))


if __name__ == "__main__":
    raise SystemExit(main())
