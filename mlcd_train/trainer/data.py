"""The training data stream: shards joined to their labels, augmented, batched per rank.

Shard mode: :class:`LabeledStream` wraps the reader's resampled ``ShardDataset`` (seeded, the
same number of samples on every rank), joins each sample to its row of
``LABELS/<shard>.labels.npy`` by ``__key__`` (checked against ``<shard>.keys.npy``), and
applies the augmentation.  The augmentation draws its randomness from a generator seeded by
``(seed, rank, position of the sample in this rank's stream)``, never from a worker's RNG
history, so a resumed run (the reader's ``set_resume``) sees the very same pixels.

Synthetic mode (``data.synthetic=true``): a few batches of random images and labels held in
memory and cycled; no loader, no workers.  Benchmarks use it to measure the trainer alone.

Errors that the user can fix (a label file missing, a row count or a key that does not match
a shard) are MLCDErrors naming the shard; :func:`check_labels` raises them before step 1.
"""
from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from mlcd_train.utils.errors import MLCDError
from mlcd_train.utils.io import json_field, load_json, open_regular, safe_np_load

_MASK = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64 mixing; stable across processes and runs)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x = z ^ (z >> 31)
    return x & _MASK


# ----------------------------------------------------------------------------- labels

#: label files hold int32 class ids (``mlcd assign``), so k cannot exceed this
MAX_CLASSES = 2 ** 31 - 1


def labels_meta(labels_dir: str) -> dict:
    """``LABELS/meta.json`` with the keys the trainer uses checked: ``k`` (classes, 1 ..
    2**31 - 1), ``topk`` (label columns, 1 .. k) and ``centroids_sha`` (a string, or absent /
    null); a missing key or another type or range is an MLCDError naming the file and key."""
    path = Path(labels_dir) / "meta.json"
    meta = load_json(path, expect=dict)
    k = json_field(meta, "k", int, path)
    topk = json_field(meta, "topk", int, path)
    if not 1 <= k <= MAX_CLASSES:
        raise MLCDError(f"{path}: key 'k' should be a number of classes in 1..{MAX_CLASSES}, found {k}")
    if not 1 <= topk <= k:
        raise MLCDError(f"{path}: key 'topk' should be a number of label columns in 1..k={k}, found {topk}")
    json_field(meta, "centroids_sha", str, path, default=None, nullable=True)
    return meta


def check_k_against_centroids(meta: dict, path, k: int) -> None:
    """When the labels' meta.json names its centres (``centroids``: the absolute path `mlcd
    assign` records) and that is a readable .npy, k must be its number of rows: only the
    header is read (cheap, any size).  A path that is gone, relative, special or unreadable
    is not checked.  A mismatch is a one-line warning naming both files, not a refusal: the
    trainer never reads the centres, and a folder re-clustered after `mlcd assign`, or the same
    path on another machine, would otherwise stop a run whose labels are sound (the Partial FC
    memory check and the labels' range check guard k itself)."""
    c = meta.get("centroids")
    if not isinstance(c, str) or not c or "\0" in c or not os.path.isabs(c) or not os.path.isfile(c):
        return
    from clustering.store import npy_info

    try:
        shape = npy_info(c, "centroids").shape
    except (MLCDError, OSError, ValueError):
        return
    if len(shape) == 2 and shape[0] != k:
        import sys

        print(f"mlcd train: warning: {path}: key 'k' is {k}, but the centres it names ('centroids': {c}) hold "
              f"{shape[0]} rows: the meta.json was edited, or those centres were replaced after `mlcd assign`; "
              "training goes on with k from the meta.json", file=sys.stderr, flush=True)


def labels_identity(labels_dir: str) -> dict:
    """What a run's class centres stand for: the label folder and the fingerprint of the
    centres it was assigned against (``centroids_sha`` of ``mlcd assign``'s meta.json; None
    for folders written before it was recorded).  Saved with each checkpoint, compared on
    resume by :func:`check_same_labels`."""
    meta = labels_meta(labels_dir)
    sha = meta.get("centroids_sha")
    return {"dir": str(Path(labels_dir).resolve()), "k": meta.get("k"),
            "centroids_sha": sha if isinstance(sha, str) and sha else None}


def check_same_labels(saved: dict | None, now: dict | None, checkpoint) -> None:
    """A resume continues the Partial FC centres of ``checkpoint``: refuse labels assigned
    against other centres (same k, so nothing else would notice), naming both folders."""
    if not isinstance(saved, dict) or not isinstance(now, dict):
        return  # a checkpoint from before labels were recorded, or synthetic data
    a, b = saved.get("centroids_sha"), now.get("centroids_sha")
    if a and b and a != b:
        raise MLCDError(f"config key 'data.labels': {now.get('dir')} was assigned against other centres "
                        f"(centroids_sha {b[:12]}) than the labels {saved.get('dir')} (centroids_sha {a[:12]}) "
                        f"the checkpoint {checkpoint} was trained on; its class centres would stand for other "
                        "clusters. Resume with the original data.labels, or start over in another output_dir "
                        "(init.checkpoint=... keeps the backbone)")


def open_label_files(labels_dir: Path, name: str, *, keys_mmap: bool = False):
    """(labels [n, L] memory-mapped, keys [n], labels path, keys path) of shard ``name`` in an
    ``mlcd assign`` folder: the one reader of label files (``check_labels`` before step 1 and
    :class:`LabelTable` while training), each file a regular file loaded without unpickling; a
    missing file, a labels array that is not [n, L] or a row count that differs from the keys'
    is an MLCDError naming the shard and the file."""
    lab, keys = Path(labels_dir) / f"{name}.labels.npy", Path(labels_dir) / f"{name}.keys.npy"
    for p in (lab, keys):
        if not p.is_file():
            raise MLCDError(f"shard {name}: label file {p} is missing (run `mlcd assign` on these shards)")
    labels = safe_np_load(lab, "label array", mmap_mode="r")
    k = safe_np_load(keys, "key array", mmap_mode="r" if keys_mmap else None)
    if labels.ndim != 2:
        raise MLCDError(f"shard {name}: {lab} should be [n, L], has shape {labels.shape}")
    if labels.shape[0] != k.shape[0]:
        raise MLCDError(f"shard {name}: {lab} has {labels.shape[0]} rows but {keys} has {k.shape[0]} keys")
    return labels, k, lab, keys


def check_labels(shards: list[str], labels_dir: str, sizes: dict | None, l: int,
                 check_keys_shards: int = 1) -> None:
    """Before step 1: every shard has label files with matching row counts (and keys).

    ``sizes``: shard name -> sample count (``sizes.json``); the labels may have fewer rows
    (corrupt samples are left out by ``mlcd embed``) but never more.  The keys of the first
    ``check_keys_shards`` shards are compared with the tar's members.
    """
    from mlcd_train.data.reader import shard_name

    ldir = Path(labels_dir)
    for i, path in enumerate(shards):
        name = shard_name(path)
        labels, k, lab, keys = open_label_files(ldir, name, keys_mmap=True)
        if labels.shape[1] < l:
            raise MLCDError(f"shard {name}: {lab} has {labels.shape[1]} label columns, loss.l={l} needs more")
        if sizes is not None and name + ".tar" in sizes and labels.shape[0] > int(sizes[name + ".tar"]):
            raise MLCDError(f"shard {name}: {lab} has {labels.shape[0]} rows but the shard holds only "
                            f"{sizes[name + '.tar']} samples (labels from other shards?)")
        if i < check_keys_shards:
            missing = sorted(set(map(str, k)) - _tar_keys(path))
            if missing:
                raise MLCDError(f"shard {name}: {len(missing)} keys of {keys} are not in {path} "
                                f"(first: {missing[0]!r}); are these labels for other shards?")


def _tar_keys(path: str) -> set[str]:
    import tarfile

    keys = set()
    try:  # a FIFO or device named like a shard is refused, not waited on
        with open_regular(path, what="shard") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for m in tf:
                if m.isfile():
                    d, b = os.path.split(m.name)
                    keys.add(os.path.join(d, b.split(".", 1)[0]) if d else b.split(".", 1)[0])
    except FileNotFoundError:
        raise MLCDError(f"{path}: shard not found") from None
    except tarfile.TarError as exc:
        raise MLCDError(f"{path}: not a readable tar shard ({exc})") from None
    return keys


class LabelTable:
    """Lazily loaded ``<shard>.labels.npy`` / ``keys.npy`` lookups (a few shards cached)."""

    def __init__(self, labels_dir: str, l: int, cache: int = 8):
        self.dir = Path(labels_dir)
        self.l = l
        self.cache: dict[str, tuple[dict, np.ndarray]] = {}
        self.max_cache = cache

    def _load(self, shard: str):
        if shard not in self.cache:
            labels, k, _, keys = open_label_files(self.dir, shard)
            index = {str(key): i for i, key in enumerate(k)}
            if len(index) != len(k):  # a join by key would hand one sample the other's labels
                _, first, counts = np.unique(k, return_index=True, return_counts=True)
                raise MLCDError(f"shard {shard}: key {str(k[first[counts > 1][0]])!r} appears "
                                f"{int(counts.max())} times in {keys}; labels are joined to samples by "
                                "key, so keys must be unique within a shard")
            if len(self.cache) >= self.max_cache:
                self.cache.pop(next(iter(self.cache)))
            self.cache[shard] = (index, labels)
        return self.cache[shard]

    def get(self, shard: str, key: str) -> np.ndarray:
        index, labels = self._load(shard)
        row = index.get(str(key))
        if row is None:
            raise MLCDError(f"shard {shard}: sample {key!r} has no row in {self.dir / (shard + '.keys.npy')} "
                            "(labels written for other shards?)")
        return np.asarray(labels[row, : self.l], dtype=np.int64)


# ----------------------------------------------------------------------------- augmentation

class Augment:
    """Random resized crop + horizontal flip [+ RandAugment + colour jitter] + normalisation
    [+ random erasing], every draw a function of the sample's seed.

    The crop follows torchvision's RandomResizedCrop (area fraction in ``scale``, log-uniform
    aspect ratio in ``ratio``, 10 tries, then a centre crop), resized bicubically by PIL.
    RandAugment, ColorJitter and RandomErasing are torchvision's; they draw from the global
    torch generator, so each runs inside ``torch.random.fork_rng`` seeded from the sample's
    seed: the same sample at the same stream position gets the same pixels in any worker, and
    the caller's generator state is left as it was.  Off by default (the keys in
    ``data.aug``); the authors' Unicom trainers use RandAugment (2 ops, magnitude 9), colour
    jitter 0.4 and random erasing 0.25.
    """

    def __init__(self, image_size: int, aug) -> None:
        self.size = image_size
        self.rrc = aug.random_resized_crop
        self.scale = tuple(aug.scale)
        self.log_ratio = (math.log(aug.ratio[0]), math.log(aug.ratio[1]))
        self.flip = aug.flip
        self.mean = torch.tensor(aug.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(aug.std, dtype=torch.float32).view(3, 1, 1)
        from torchvision import transforms as T

        self.pil_ops = []
        if getattr(aug, "rand_augment", 0):
            self.pil_ops.append(T.RandAugment(num_ops=aug.rand_augment, magnitude=aug.rand_augment_magnitude,
                                              interpolation=T.InterpolationMode.BILINEAR))
        if getattr(aug, "color_jitter", 0.0):
            c = float(aug.color_jitter)
            self.pil_ops.append(T.ColorJitter(brightness=c, contrast=c, saturation=c))
        p = float(getattr(aug, "random_erasing", 0.0))
        # erase with the per-channel mean (0 after normalisation), as timm's 'const' mode
        self.erase = T.RandomErasing(p=p, value=0.0) if p > 0 else None

    def _crop_box(self, w: int, h: int, g: torch.Generator) -> tuple[int, int, int, int]:
        area = w * h
        u = torch.rand(10, 4, generator=g).tolist()
        for us, ur, ui, uj in u:
            target = area * (self.scale[0] + us * (self.scale[1] - self.scale[0]))
            ratio = math.exp(self.log_ratio[0] + ur * (self.log_ratio[1] - self.log_ratio[0]))
            cw = int(round(math.sqrt(target * ratio)))
            ch = int(round(math.sqrt(target / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                i = int(ui * (h - ch + 1))
                j = int(uj * (w - cw + 1))
                return i, j, ch, cw
        # fall back to a centre crop at the clamped ratio
        in_ratio = w / h
        lo, hi = math.exp(self.log_ratio[0]), math.exp(self.log_ratio[1])
        if in_ratio < lo:
            cw, ch = w, int(round(w / lo))
        elif in_ratio > hi:
            ch, cw = h, int(round(h * hi))
        else:
            cw, ch = w, h
        return (h - ch) // 2, (w - cw) // 2, ch, cw

    def __call__(self, img, seed: int) -> torch.Tensor:
        """Crop box and flip drawn from ``seed``; bicubic resize (PIL, antialiased) of the box."""
        g = torch.Generator().manual_seed(seed)
        w, h = img.size
        if self.rrc:
            i, j, ch, cw = self._crop_box(w, h, g)
        else:
            i, j, ch, cw = 0, 0, h, w
        img = img.convert("RGB").resize((self.size, self.size), Image.BICUBIC, box=(j, i, j + cw, i + ch))
        if self.flip and bool(torch.rand(1, generator=g).item() < 0.5):
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.pil_ops or self.erase is not None:
            with torch.random.fork_rng(devices=[]):
                # the CPU generator only (torch.manual_seed would also reseed CUDA's, which fork_rng(devices=[])
                # does not restore)
                torch.default_generator.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
                for op in self.pil_ops:
                    img = op(img)
                x = self._normalise(img)
                if self.erase is not None:
                    x = self.erase(x)
            return x
        return self._normalise(img)

    def _normalise(self, img) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std


# ----------------------------------------------------------------------------- stream

def pick_source(cum: list[float], seed: int, rank: int, pos: int) -> int:
    """The source of the sample at stream position ``pos`` of ``rank``: drawn with probability
    proportional to its weight (``cum``: the cumulative normalised weights), a pure function
    of (seed, rank, position), so a resume draws the same sources."""
    if len(cum) == 1:
        return 0
    u = mix_seed(seed, rank, pos, 0x50C5) / float(1 << 63)
    for i, c in enumerate(cum):
        if u < c:
            return i
    return len(cum) - 1


class LabeledStream(IterableDataset):
    """(image tensor, labels [l], stats...) samples for one rank; batches come from a DataLoader.

    ``datasets`` / ``labels``: one reader and one label table per data source (one unless
    ``data.sources``); each sample's source is :func:`pick_source` of its stream position.
    ``resume_batches``: batches of ``batch_size`` this rank consumed before (exact resume).
    The augmentation seed of a sample is ``mix_seed(seed, rank, position)`` where position
    counts samples in this rank's stream from the start of training; DataLoader worker ``w``
    of ``nw`` produces stream batches ``resume_batches + w + nw * i``.
    """

    def __init__(self, datasets, labels, augment: Augment, seed: int, rank: int,
                 batch_size: int, resume_batches: int = 0, weights: list[float] | None = None):
        self.datasets = list(datasets) if isinstance(datasets, (list, tuple)) else [datasets]
        self.labels = list(labels) if isinstance(labels, (list, tuple)) else [labels]
        self.augment = augment
        self.seed, self.rank = seed, rank
        self.batch_size = batch_size
        self.resume_batches = resume_batches
        w = [float(x) for x in (weights or [1.0] * len(self.datasets))]
        total, acc, self.cum = sum(w), 0.0, []
        for x in w:
            acc += x / total
            self.cum.append(acc)

    @property
    def dataset(self):  # the single-source reader (what callers of one source used)
        return self.datasets[0]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        n = 0
        B = self.batch_size
        iters = [iter(ds) for ds in self.datasets]
        # (original worker this one plays, records it skips) in each source
        base = [ds._resume_point(w, nw) if hasattr(ds, "_resume_point") else (w, 0) for ds in self.datasets]
        while True:
            batch = self.resume_batches + w + nw * (n // B)
            pos = batch * B + n % B
            src = pick_source(self.cum, self.seed, self.rank, pos)
            try:
                s = next(iters[src])
            except StopIteration:
                return
            x = self.augment(s.image, mix_seed(self.seed, self.rank, pos))
            y = torch.from_numpy(self.labels[src].get(s.shard, s.key))
            n += 1
            # the readers' counters live in this worker: they travel with the batch (the original
            # worker this one plays, and its position in records of every source, for resume)
            st = [getattr(ds, "stats", None) or {} for ds in self.datasets]
            # a source this worker has not read from yet: still at its resume point
            where = [t["skipped"] + t["records"] if "worker" in t else b[1] for t, b in zip(st, base)]
            yield (x, y, w, sum(t.get("corrupt", 0) for t in st), sum(t.get("records", 0) for t in st),
                   base[0][0], where[0], src, torch.tensor(where, dtype=torch.int64))


def _worker_init(_):
    # Preemption signals go to the whole process group; the loader workers must survive them
    # so that the trainer can finish its step, save and shut the workers down itself.
    for sig in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)):
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)
    torch.set_num_threads(1)


def data_sources(cfg) -> list[dict]:
    """[{shards, labels, weight}]: ``data.sources``, or the one source of data.shards / data.labels."""
    if cfg.data.sources:
        return [{"shards": str(s["shards"]), "labels": str(s["labels"]), "weight": float(s.get("weight", 1.0))}
                for s in cfg.data.sources]
    return [{"shards": cfg.data.shards, "labels": cfg.data.labels, "weight": 1.0}]


def check_same_centres(sources: list[dict]) -> dict:
    """The label folders of several sources must be assignments against the same centres
    (``centroids_sha`` of their meta.json, and the same k): the class ids then mean the same
    clusters.  Returns the first folder's meta; a mismatch names both folders."""
    metas = [labels_meta(s["labels"]) for s in sources]
    first, m0 = sources[0]["labels"], metas[0]
    for src, m in zip(sources[1:], metas[1:]):
        a, b = m0.get("centroids_sha"), m.get("centroids_sha")
        if not (isinstance(a, str) and a and isinstance(b, str) and b):
            missing = first if not (isinstance(a, str) and a) else src["labels"]
            raise MLCDError(f"config key 'data.sources': {missing}/meta.json records no centroids_sha, so its "
                            f"centres cannot be checked against {src['labels'] if missing == first else first}'s "
                            "(re-run `mlcd assign`, which records it)")
        if a != b or m0.get("k") != m.get("k"):
            raise MLCDError(f"config key 'data.sources': {src['labels']} (centroids_sha {b[:12]}, k {m.get('k')}) "
                            f"and {first} (centroids_sha {a[:12]}, k {m0.get('k')}) were assigned against "
                            "different centres; every source must be labelled with the same `mlcd assign` "
                            "centroids")
        if m.get("topk") != m0.get("topk"):
            m0 = dict(m0, topk=min(int(m0.get("topk") or 0), int(m.get("topk") or 0)))
    return m0


def build_shard_loader(cfg, rank: int, world_size: int, batch_size: int, resume_batches: int,
                       image_size: int, pin_memory: bool = False, positions: dict | None = None):
    """The DataLoader of this rank; batches are (images, labels, worker, corrupt, records,
    original worker, its position in the first source, source, positions [per source]).
    ``positions``: {original worker: records it consumed of each source (a list, or one int
    for one source)}, as in :meth:`ShardDataset.set_resume`."""
    from mlcd_train.data.reader import ShardDataset, list_shards

    sources = data_sources(cfg)
    datasets, tables = [], []
    for i, src in enumerate(sources):
        ds = ShardDataset(list_shards(src["shards"]), transform=None, rank=rank, world_size=world_size,
                          resampled=True, seed=cfg.seed if i == 0 else mix_seed(cfg.seed, i),
                          shuffle_buffer=cfg.data.shuffle_buffer, max_corrupt_fraction=cfg.data.max_corrupt_fraction)
        pos_i = None
        if positions:
            pos_i = {int(w): int(n[i] if isinstance(n, (list, tuple)) else n) for w, n in positions.items()}
        ds.set_resume(resume_batches, batch_size, pos_i)
        datasets.append(ds)
        tables.append(LabelTable(src["labels"], cfg.loss.l))
    nw = cfg.data.num_workers
    stream = LabeledStream(datasets, tables, Augment(image_size, cfg.data.aug), cfg.seed, rank, batch_size,
                           resume_batches, weights=[s["weight"] for s in sources])
    kw = dict(num_workers=nw, batch_size=batch_size, pin_memory=pin_memory, drop_last=True)
    if nw > 0:
        kw.update(prefetch_factor=cfg.data.prefetch_factor, persistent_workers=False,
                  worker_init_fn=_worker_init)
    return DataLoader(stream, **kw), datasets[0]


class TrainStream:
    """The trainer's data: an iterator of :class:`~mlcd_train.trainer.step.Batch` whose position
    is saved and restored through :meth:`state_dict` / :meth:`load_state_dict` (call it before
    the first batch).  The state: micro-batches consumed, and {original loader worker: records
    it consumed of each source} from the last batch each worker made, which makes a resume
    exact even past corrupt samples.  Counts corrupt samples per worker (:meth:`corrupt`)."""

    def __init__(self, cfg, rank: int, world_size: int, batch_size: int, image_size: int,
                 pin_memory: bool = False):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.batch_size, self.image_size, self.pin_memory = batch_size, image_size, pin_memory
        self.consumed = 0
        self.positions: dict[int, list[int]] = {}
        self.worker_stats: dict[int, tuple[int, int]] = {}
        self.source_counts: list[int] = [0] * len(data_sources(cfg)) if not cfg.data.synthetic else [0]
        self._it = None
        self._loader = None

    def state_dict(self) -> dict:
        return {"batches": self.consumed, "positions": {int(w): list(p) for w, p in self.positions.items()},
                "sources": len(self.source_counts)}

    def load_state_dict(self, sd: dict) -> None:
        if self._it is not None:
            raise RuntimeError("TrainStream.load_state_dict: the stream has started")
        self.consumed = int(sd.get("batches", 0))
        pos = sd.get("positions") or {}
        n = len(self.source_counts)
        self.positions = {}
        for w, p in pos.items():
            p = list(p) if isinstance(p, (list, tuple)) else [int(p)]
            if len(p) == n:
                self.positions[int(w)] = [int(x) for x in p]

    def _start(self):
        cfg = self.cfg
        if cfg.data.synthetic:
            self._it = SyntheticBatches(cfg.data.synthetic_batches, self.batch_size, self.image_size,
                                        cfg.loss.num_classes, cfg.loss.l, cfg.seed, self.rank, start=self.consumed)
            return
        self._loader, _ = build_shard_loader(cfg, self.rank, self.world_size, self.batch_size, self.consumed,
                                             self.image_size, pin_memory=self.pin_memory,
                                             positions=self.positions or None)
        self._it = iter(self._loader)

    def __iter__(self):
        return self

    def __next__(self):
        from mlcd_train.trainer.step import Batch

        if self._it is None:
            self._start()
        raw = next(self._it)
        self.consumed += 1
        if len(raw) > 2:  # (worker, corrupt, records, original worker, position, source, positions)
            self.worker_stats[int(raw[2][-1])] = (int(raw[3][-1]), int(raw[4][-1]))
            self.positions[int(raw[5][-1])] = [int(x) for x in raw[8][-1]]
            for s in raw[7].tolist():
                self.source_counts[s] += 1
        return Batch(raw[0], raw[1])

    def corrupt(self) -> int:
        """Corrupt samples this rank's loader workers skipped (since this run started)."""
        return sum(c for c, _ in self.worker_stats.values())

    def close(self) -> None:
        """Stop the loader workers now: they ignore SIGTERM (so that a preemption signal to the
        process group cannot kill them mid-step), so leaving them to Python's exit handlers
        would block until the launcher's SIGKILL."""
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


class SyntheticBatches:
    """A few in-memory batches of random images and labels, cycled (seeded by seed and rank)."""

    def __init__(self, n_batches: int, batch_size: int, image_size: int, num_classes: int, l: int,
                 seed: int, rank: int, start: int = 0):
        g = torch.Generator().manual_seed(mix_seed(seed, rank, 0xDA7A))
        self.batches = []
        for _ in range(max(1, n_batches)):
            x = torch.randn(batch_size, 3, image_size, image_size, generator=g)
            y = torch.randint(0, num_classes, (batch_size, l), generator=g)
            self.batches.append((x, y))
        self.i = start

    def __iter__(self):
        return self

    def __next__(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b
