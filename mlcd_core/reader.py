"""The shard reader used by ``embed``, ``assign``, ``probe`` and the trainer.

    ds = ShardDataset("shards/", transform=tf)                       # every sample once
    ds = ShardDataset("shards/", transform=tf, resampled=True, seed=0,
                      shuffle_buffer=1000)                          # endless training stream
    ds.set_resume(batches_consumed, batch_size)                     # exact resume
    loader = DataLoader(ds, batch_size=B, num_workers=nw, collate_fn=collate_samples)

**Safety.** Tar members are read with :mod:`tarfile` and only image members (png, jpg, ...)
and ``.cls`` are ever read; anything else (``.pyd``, ``.pickle``, ``.npy`` ...) is skipped
without being read, let alone unpickled (webdataset's default decoders would unpickle them,
and shards come from the internet).  Images are decoded with PIL into RGB.

**Corrupt samples** (no image member, undecodable or truncated image, bad ``.cls``) are
skipped, logged (logger ``mlcd.reader``) and counted in ``dataset.stats`` (a dict:
``records``, ``samples``, ``corrupt``, ``corrupt_shards``, ``reasons``).  ``stats`` lives in
the process that iterates: with DataLoader workers, each worker has its own copy, so use
``max_corrupt_fraction=F`` to stop: a worker that has read at least ``min_records_for_check``
records of which more than a fraction F were corrupt raises :class:`MLCDError` naming the
shard, and the DataLoader re-raises it in the main process.  A shard that cannot be read at
all or is truncated is counted in ``corrupt_shards`` and the rest of it is skipped.

**Splitting.** Without ``resampled``, shards are split over ranks (``shards[rank::world]``)
and then over DataLoader workers (``[worker::num_workers]``): every sample is read exactly
once in total, in shard order (ranks may get different counts: fine for ``embed``, never
for DDP training).  With ``resampled=True`` every (rank, worker) reads an endless stream:
pass ``p`` takes a permutation of all shards seeded by ``(seed, epoch, p)`` — the same on
every rank — and hands its shards out to ranks then workers the same way (a rank or worker
left without a shard in a pass reads one shared with others).  ``samples_per_rank=N`` cuts
the stream so every rank yields exactly N samples (worker w yields ``N // nw + (w < N % nw)``),
so no DDP rank waits for another.  ``shuffle_buffer=K`` permutes each successive block of K
records of a worker's stream with a seeded permutation (the raw bytes are buffered, images
are decoded only when yielded).

**Exact resume.** ``DataLoader(ds, batch_size=B, num_workers=nw)`` takes batch b from
worker ``b % nw`` while every worker still has batches, then round-robin over those that
do.  ``set_resume(batches_consumed, B)`` makes the next iteration yield exactly what the
uninterrupted iteration would have yielded after ``batches_consumed`` batches: new worker
w' plays original worker ``(w' + batches_consumed) % nw`` and skips the
``len(range(w, batches_consumed, nw)) * B`` samples that worker had produced (a finite
stream whose workers run out at different times is replayed batch by batch instead, with
the DataLoader's default drop_last=False: :meth:`ShardDataset._resume_point`).  Skipping
decodes nothing: whole passes and shards are skipped with the counts of ``sizes.json``, the
rest of the shard by reading tar headers.  It assumes the same world size, num_workers,
batch size, seed, epoch, shuffle_buffer and shards as the interrupted run.  Counting
batches x B sees samples, not records: each corrupt sample before the resume point would
shift the resumed stream by one, so ``set_resume(..., positions)`` takes each worker's
position in records (``stats['skipped'] + stats['records']`` of its last consumed batch;
the trainer saves them in its checkpoints) and is exact past corrupt samples too.
"""
from __future__ import annotations

import glob
import io
import logging
import math
import os
import stat
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Union

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mlcd_core.errors import MLCDError

log = logging.getLogger("mlcd.reader")

#: tar member extensions decoded as images (everything else except ``cls`` is never read)
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm")
_WANTED = frozenset(IMAGE_EXTS) | {"cls"}


class Sample(NamedTuple):
    """One decoded sample."""
    image: Any          # PIL RGB image, or the transform's output
    shard: str          # shard name (tar file name without .tar)
    index: int          # position in its tar, counting every sample (corrupt ones too)
    key: str            # __key__
    cls: Optional[int]  # ground-truth class id, None when unknown


class CorruptSample(Exception):
    """A sample that cannot be decoded (the message is the reason)."""


# ----------------------------------------------------------------------------- shard lists

def shard_name(path: Union[str, os.PathLike]) -> str:
    """``/x/shard-000003.tar`` -> ``shard-000003`` (the stem used by every output file)."""
    name = os.path.basename(os.fspath(path))
    return name[:-4] if name.endswith(".tar") else name


def _expand_one(src: str) -> list[str]:
    if "{" in src:
        import braceexpand

        out = []
        for p in braceexpand.braceexpand(src):
            out.extend(_expand_one(p))
        return out
    p = Path(src).expanduser()
    if p.is_dir():
        sizes = p / "sizes.json"
        if sizes.is_file():
            names = list(sizes_counts(str(p)))  # plain file names: stay in ``p``; counts checked
            return [str((p / n).resolve()) for n in names]
        return [str(q.resolve()) for q in sorted(p.glob("*.tar"))]
    if any(ch in src for ch in "*?["):
        return [str(Path(q).resolve()) for q in sorted(glob.glob(os.path.expanduser(src)))]
    if not p.is_file():
        raise MLCDError(f"{src}: shard or shard folder not found")
    return [str(p.resolve())]


def list_shards(src: Union[str, os.PathLike, Iterable]) -> list[str]:
    """Shard paths from a folder (its sizes.json order, else sorted ``*.tar``), a tar, a brace
    pattern (``a-{000000..000009}.tar``), a glob, or a list of those; sorted, absolute, unique."""
    items = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    out = []
    for item in items:
        out.extend(_expand_one(os.fspath(item)))
    if not out:
        raise MLCDError(f"{src}: no shards (*.tar) found")
    return sorted(set(out))


def count_records(path: str) -> int:
    """Number of samples in a tar, from its headers (no member is read)."""
    n = 0
    try:
        for i, _, _, _ in _iter_members(path, read=False):
            n = i + 1
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise MLCDError(f"{path}: shard not found") from None
        log.warning("%s: unreadable or truncated (%s); counted %d samples", path, exc, n)
    return n


#: the largest class id a ``.cls`` member may hold (stored as int32)
MAX_CLS = 2 ** 31 - 1

#: the fewest bytes a sample takes in a tar: one member's header
TAR_BLOCK = 512


def sizes_counts(folder: str, only: Optional[Iterable[str]] = None) -> dict[str, int]:
    """``FOLDER/sizes.json`` checked: {plain file name: count}, every listed shard (or only
    those named in ``only``) a file of this folder that can hold its count (a tar needs a
    512-byte header a sample, so a count above its size / 512 cannot be true); else an
    MLCDError naming sizes.json."""
    from mlcd_core.io import json_counts, load_json

    f = os.path.join(folder, "sizes.json")
    counts = json_counts(load_json(f), f)
    wanted = None if only is None else set(only)
    for name, n in counts.items():
        if wanted is not None and name not in wanted:
            continue
        path = os.path.join(folder, name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise MLCDError(f"{path}: listed in {f} but missing") from None
        except OSError as exc:
            raise MLCDError(f"{path}: listed in {f} but cannot be read ({exc.strerror or exc})") from None
        if not stat.S_ISREG(st.st_mode):
            raise MLCDError(f"{path}: listed in {f} but missing (not a regular file)")
        if n > st.st_size // TAR_BLOCK:
            raise MLCDError(f"{f}: count of {name!r} is {n}, but {path} has {st.st_size} bytes, room for at "
                            f"most {st.st_size // TAR_BLOCK} samples (each takes a {TAR_BLOCK}-byte tar header); "
                            "the shards were changed after `mlcd shards` wrote sizes.json")
    return counts


def read_sizes(shards: Iterable[str]) -> dict[str, int]:
    """{shard path: sample count} from each folder's ``sizes.json`` (:func:`sizes_counts`);
    tars it does not list are counted."""
    shards = list(shards)
    names: dict[str, set] = {}
    for s in shards:
        folder, name = os.path.split(s)
        names.setdefault(folder, set()).add(name)
    # only the asked-for shards are checked: a subset of a folder (a glob, a list) still reads
    # when another shard that sizes.json lists is gone
    cache = {folder: sizes_counts(folder, only=want) if os.path.isfile(os.path.join(folder, "sizes.json")) else {}
             for folder, want in names.items()}
    out = {}
    for s in shards:
        folder, name = os.path.split(s)
        n = cache[folder].get(name)
        out[s] = int(n) if n is not None else count_records(s)
    return out


# ----------------------------------------------------------------------------- tar records

def _split_name(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the base name, ext = the rest."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


def _check_end(tf: tarfile.TarFile) -> None:
    """tarfile ends quietly at a cut; a complete tar has a zero end-of-archive block there."""
    tf.fileobj.seek(tf.offset)
    tail = tf.fileobj.read(512)
    if len(tail) < 512 or tail.count(0) != 512:
        raise tarfile.ReadError(f"truncated at byte {tf.offset} (no end-of-archive block)")


def _iter_members(path: str, start: int = 0, step: int = 1,
                  read: bool = True) -> Iterator[tuple[int, str, str, Optional[bytes]]]:
    """Yield (sample number, key, ext, bytes or None) for every regular member.  Only wanted
    members (images, cls) of the samples ``start, start + step, ...`` are read; the others are
    passed over unread (bytes None)."""
    from mlcd_core.io import open_regular

    try:
        raw = open_regular(path, what="shard")  # a FIFO or device named x.tar is never read
    except FileNotFoundError:
        raise MLCDError(f"{path}: shard not found") from None
    try:
        tf = tarfile.open(fileobj=raw, mode="r:")
    except BaseException:
        raw.close()
        raise
    f = tf.fileobj
    with raw, tf:
        n, last = -1, None
        while True:
            ti = tf.next()
            if ti is None:
                _check_end(tf)
                break
            if not ti.isreg():
                continue
            key, ext = _split_name(ti.name)
            if key != last:
                n, last = n + 1, key
            data = None
            if read and ext in _WANTED and n >= start and (n - start) % step == 0:
                if ti.size > MAX_MEMBER_BYTES:  # checked before a byte is read
                    yield n, key, TOO_LARGE, str(ti.size).encode()
                    continue
                if ti.sparse is None:  # a plain member: its bytes lie at offset_data
                    f.seek(ti.offset_data)
                    data = f.read(ti.size)
                    if len(data) != ti.size:
                        raise tarfile.ReadError(f"member {ti.name} cut short")
                else:
                    data = tf.extractfile(ti).read()
            yield n, key, ext, data
            tf.members = []  # keep memory flat on large shards


CUT_SHORT = "__cut_short__"  # member marking the sample a broken shard ended in
TOO_LARGE = "__too_large__"  # member marking a sample with a member over MAX_MEMBER_BYTES
#: no image member is read past this size (a tar header may claim any size): the sample is corrupt
MAX_MEMBER_BYTES = 256 << 20


def iter_records(path: str, start: int = 0, step: int = 1,
                 stats: Optional[dict] = None) -> Iterator[tuple[int, str, dict]]:
    """Yield (index, key, {ext: bytes}) for the samples ``start, start + step, ...`` of a tar.

    Only image and ``cls`` members of those samples are read; other samples are passed over
    unread.  A tar that cannot be read (bad header, cut short) ends with a warning and
    ``stats['corrupt_shards'] += 1``."""
    index, cur_key, cur = -1, None, None
    try:
        for n, key, ext, data in _iter_members(path, start, step):
            if n != index:
                if cur is not None:
                    yield index, cur_key, cur
                index, cur_key = n, key
                cur = {} if n >= start and (n - start) % step == 0 else None
            if cur is not None and data is not None:
                cur.setdefault(ext, data)
    except (tarfile.TarError, OSError, EOFError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise MLCDError(f"{path}: shard not found") from None
        log.warning("%s: unreadable or truncated after sample %d (%s); rest of shard skipped", path, index, exc)
        if stats is not None:
            stats["corrupt_shards"] += 1
        if cur is not None:  # the sample being read when the shard broke off: counted as corrupt
            yield index, cur_key, {CUT_SHORT: b""}
        return
    if cur is not None:
        yield index, cur_key, cur


#: background of transparent pixels: white, as transformers' CLIPImageProcessor (do_convert_rgb,
#: the config mlcd convert writes) composites them, so a converted model sees what we trained on
ALPHA_BACKGROUND = (255, 255, 255)


def to_rgb8(img):
    """A PIL image of any mode as 8-bit RGB: 16-bit ("I;16*", and "I" holding values up to
    65535) scaled by 1/257, other "I" / "F" ranges scaled from their min..max to 0..255,
    transparency (RGBA, LA, PA, P or L/RGB with a transparent colour) composited on white."""
    from PIL import Image

    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I") or mode == "F":
        a = np.asarray(img).astype(np.float64)
        if a.ndim == 3:  # not expected from PIL for these modes; keep the first channel
            a = a[..., 0]
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode.startswith("I;16") or (lo >= 0 and 255 < hi <= 65535 and mode == "I"):
            a = a / 257.0
        elif mode == "F" and lo >= 0 and hi <= 1:
            a = a * 255.0
        elif lo < 0 or hi > 255:
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        gray = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
        return gray.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_record(members: dict) -> tuple[Any, Optional[int]]:
    """(PIL RGB image, cls) from a record's members; raises CorruptSample."""
    from PIL import Image

    if CUT_SHORT in members:
        raise CorruptSample("in a shard cut short")
    if TOO_LARGE in members:
        raise CorruptSample(f"member too large ({members[TOO_LARGE].decode()} bytes, limit {MAX_MEMBER_BYTES})")
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None:
        raise CorruptSample("no image member")
    cls = None
    if "cls" in members:
        try:
            cls = int(members["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise CorruptSample(f"bad cls {members['cls'][:20]!r}") from None
        if not 0 <= cls <= MAX_CLS:  # class ids are stored as int32 (EMB/<shard>.cls.npy)
            raise CorruptSample(f"bad cls {members['cls'][:20]!r} (a class id is in 0..{MAX_CLS})")
    try:
        image = to_rgb8(Image.open(io.BytesIO(members[ext])))
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds on bad data
        raise CorruptSample(f"undecodable {ext} ({type(exc).__name__}: {exc})") from None
    return image, cls


def collate_samples(batch: list[Sample]) -> dict:
    """DataLoader collate_fn: images stacked when they are tensors, ``cls`` as a tensor (-1 = unknown)."""
    images = [s.image for s in batch]
    if images and isinstance(images[0], torch.Tensor):
        images = torch.stack(images)
    return {"image": images,
            "cls": torch.tensor([-1 if s.cls is None else s.cls for s in batch], dtype=torch.long),
            "shard": [s.shard for s in batch],
            "index": torch.tensor([s.index for s in batch], dtype=torch.long),
            "key": [s.key for s in batch]}


# ----------------------------------------------------------------------------- dataset

def _default_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardDataset(IterableDataset):
    """Iterable dataset of :class:`Sample` over WebDataset shards (see the module docstring).

    Args:
        shards: anything :func:`list_shards` accepts.
        transform: applied to the PIL RGB image.
        rank, world_size: default: torch.distributed's, else $RANK / $WORLD_SIZE, else 0 / 1.
        resampled: endless seeded stream per (rank, worker) for training.
        seed, epoch: seed the shard permutations and the shuffle (``set_epoch`` changes epoch).
        samples_per_rank: resampled mode: every rank yields exactly this many samples.
        shuffle_buffer: K > 1 permutes each block of K records (seeded).
        max_corrupt_fraction: raise MLCDError when a worker's corrupt fraction exceeds it.
        min_records_for_check: records a worker reads before that check applies.
    """

    def __init__(self, shards, transform=None, rank: Optional[int] = None, world_size: Optional[int] = None,
                 resampled: bool = False, seed: int = 0, samples_per_rank: Optional[int] = None,
                 shuffle_buffer: int = 0, epoch: int = 0, max_corrupt_fraction: Optional[float] = None,
                 min_records_for_check: int = 200):
        super().__init__()
        self.shards = list_shards(shards)
        self.sizes = read_sizes(self.shards)
        self.shards = [s for s in self.shards if self.sizes[s] > 0]  # empty shards would idle a worker
        self.total = sum(self.sizes.values())
        if self.total == 0:
            raise MLCDError(f"{shards}: the shards hold no samples")
        r, w = _default_rank_world()
        self.rank = r if rank is None else int(rank)
        self.world_size = w if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if samples_per_rank is not None and not resampled:
            raise ValueError("samples_per_rank needs resampled=True")
        self.transform = transform
        self.resampled = resampled
        self.seed, self.epoch = int(seed), int(epoch)
        self.samples_per_rank = samples_per_rank
        self.shuffle_buffer = int(shuffle_buffer or 0)
        self.max_corrupt_fraction = max_corrupt_fraction
        self.min_records_for_check = min_records_for_check
        self.resume_batches, self.resume_batch_size = 0, 0
        self.resume_positions: Optional[dict] = None
        self.stats = self._new_stats()

    # -- configuration

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_resume(self, batches_consumed: int, batch_size: int, positions: Optional[dict] = None) -> None:
        """Continue exactly after ``batches_consumed`` batches of ``batch_size`` (see module docs).

        ``positions``: {original worker: records it had consumed}, as the stats of its last
        consumed batch said (``stats['worker']``, ``stats['skipped'] + stats['records']``);
        with them the resume is exact even past corrupt samples, which ``batches_consumed``
        alone cannot see."""
        if batches_consumed < 0 or (batches_consumed and batch_size < 1):
            raise ValueError(f"bad resume point: {batches_consumed} batches of {batch_size}")
        self.resume_batches, self.resume_batch_size = int(batches_consumed), int(batch_size)
        self.resume_positions = {int(w): int(n) for w, n in positions.items()} if positions else None

    @staticmethod
    def _new_stats() -> dict:
        return {"records": 0, "samples": 0, "corrupt": 0, "corrupt_shards": 0, "reasons": Counter()}

    def __len__(self) -> int:
        if self.resampled:
            if self.samples_per_rank is None:
                raise TypeError("an endless resampled ShardDataset has no length")
            return self.samples_per_rank
        return sum(self.sizes[s] for s in self.shards[self.rank::self.world_size])

    # -- which shards a (rank, worker) reads in pass p

    def _pass_plan(self, p: int, worker: int, nw: int) -> list[tuple[str, int, int]]:
        """What one (rank, worker) reads in pass p: [(shard, first sample, step), ...].

        Shards are dealt to ranks, then workers.  In resampled mode, with fewer shards than
        (rank, worker) slots, the pass's samples (all shards one after the other) are dealt
        instead: slot k reads samples k, k + slots, ...; so no slot idles and each pass still
        reads each sample once (a corpus smaller than the slot count is read whole by each)."""
        shards = self.shards
        if self.resampled:
            perm = np.random.default_rng([self.seed, self.epoch, p]).permutation(len(shards))
            shards = [shards[i] for i in perm]
            slots = self.world_size * nw
            if len(shards) < slots:
                if self.total < slots:
                    return [(s, 0, 1) for s in shards]
                slot, plan, offset = self.rank * nw + worker, [], 0
                for s in shards:
                    plan.append((s, (slot - offset) % slots, slots))
                    offset += self.sizes[s]
                return plan
        return [(s, 0, 1) for s in shards[self.rank::self.world_size][worker::nw]]

    def _count(self, entry: tuple[str, int, int]) -> int:
        shard, first, step = entry
        return len(range(first, self.sizes[shard], step))

    def _worker_quota(self, worker: int, nw: int) -> Optional[int]:
        if self.samples_per_rank is None:
            return None
        n = self.samples_per_rank
        return n // nw + (1 if worker < n % nw else 0)

    # -- record stream of one worker, from record ``skip`` on

    def _records(self, worker: int, nw: int, skip: int) -> Iterator[tuple[str, int, str, dict]]:
        p = 0
        while True:  # resampled: every pass gives this worker at least one record (see _pass_plan)
            plan = self._pass_plan(p, worker, nw)
            total = sum(self._count(e) for e in plan)
            if skip >= total:
                skip -= total
                if not self.resampled:
                    return
                p += 1
                continue
            got = 0
            for rec in self._pass_records(p, worker, plan, skip):
                got += 1
                yield rec
            if got == 0 and skip == 0 and self.resampled:
                # sizes.json promised records, none could be read: passing again would spin
                # forever (a hung worker, its rank stuck at the next collective)
                names = sorted({shard_name(s) for s, _, _ in plan})
                raise MLCDError(f"{os.path.dirname(plan[0][0]) or '.'}: no record could be read in a whole "
                                f"pass over this worker's {len(names)} shard(s) ({', '.join(names[:5])}"
                                f"{', ...' if len(names) > 5 else ''}) although sizes.json lists {total}: "
                                "unreadable or empty shards")
            skip = 0
            if not self.resampled:
                return
            p += 1

    def _pass_records(self, p: int, worker: int, plan: list, skip: int):
        K = self.shuffle_buffer
        block = 0
        if K > 1:
            block, skip_in_block = divmod(skip, K)
            start = block * K
        else:
            start, skip_in_block = skip, 0
        # walk to the shard holding record ``start`` of this pass, without reading
        stream = self._pass_stream(plan, start)
        if K <= 1:
            yield from stream
            return
        buf = []
        for rec in stream:
            buf.append(rec)
            if len(buf) == K:
                yield from self._permuted(buf, p, worker, block, skip_in_block)
                buf, block, skip_in_block = [], block + 1, 0
        if buf:
            yield from self._permuted(buf, p, worker, block, skip_in_block)

    def _permuted(self, buf, p, worker, block, drop):
        order = np.random.default_rng([self.seed, self.epoch, self.rank, worker, p, block, 1]).permutation(len(buf))
        for i in order[drop:]:
            yield buf[i]

    def _pass_stream(self, plan: list, start: int):
        for entry in plan:
            n = self._count(entry)
            if start >= n:
                start -= n
                continue
            shard, first, step = entry
            for index, key, members in iter_records(shard, first + start * step, step, self.stats):
                yield shard, index, key, members
            start = 0

    # -- iteration

    def _resume_point(self, new_worker: int, nw: int) -> tuple[int, int]:
        """(original worker that new worker ``new_worker`` continues, records it skips).

        The DataLoader deals batches round-robin over the workers that still have one, so
        while none has run out batch b is worker ``b % nw``'s; a finite stream whose workers
        hold different counts is replayed batch by batch (a worker's last batch may be short:
        the DataLoader's default drop_last=False)."""
        B, consumed = self.resume_batch_size, self.resume_batches
        if not consumed:
            return new_worker, 0
        left = []  # batches each original worker yields in the whole stream
        for w in range(nw):
            q = self._worker_quota(w, nw)
            if q is None and self.resampled:
                left.append(math.inf)
            else:
                n = q if q is not None else sum(self._count(e) for e in self._pass_plan(0, w, nw))
                left.append(-(-n // B))
        if consumed <= nw * min(left):  # nobody ran out: plain round-robin
            nxt, taken = consumed % nw, [len(range(w, consumed, nw)) for w in range(nw)]
        else:
            if consumed > sum(left):
                raise MLCDError(f"{self.shards[0] if self.shards else '?'}: cannot resume after {consumed} "
                                f"batches of {B}: the stream holds only {sum(left)}")
            taken, nxt = [0] * nw, 0
            for _ in range(consumed):
                while left[nxt] == 0:
                    nxt = (nxt + 1) % nw
                taken[nxt] += 1
                left[nxt] -= 1
                nxt = (nxt + 1) % nw
        worker = (new_worker + nxt) % nw
        if self.resume_positions is not None and worker in self.resume_positions:
            return worker, self.resume_positions[worker]  # records, corrupt ones included
        return worker, taken[worker] * B

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        new_worker, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        worker, skip = self._resume_point(new_worker, nw)
        quota = self._worker_quota(worker, nw)
        if quota is not None:
            skip = min(skip, quota)
            quota -= skip
        self.stats = stats = self._new_stats()
        stats["worker"], stats["skipped"] = worker, skip  # the worker's position: skipped + records
        if quota == 0:
            return
        yielded = 0
        for shard, index, key, members in self._records(worker, nw, skip):
            stats["records"] += 1
            try:
                image, cls = decode_record(members)
            except CorruptSample as exc:
                self._corrupt(shard, index, key, str(exc))
                continue
            if self.transform is not None:
                image = self.transform(image)
            stats["samples"] += 1
            yielded += 1
            yield Sample(image, shard_name(shard), index, key, cls)
            if yielded == quota:
                return

    def _corrupt(self, shard: str, index: int, key: str, reason: str) -> None:
        st = self.stats
        st["corrupt"] += 1
        st["reasons"][reason.split(" (")[0]] += 1
        if st["corrupt"] <= 20 or st["corrupt"] % 1000 == 0:
            log.warning("%s: sample %d (key %s) skipped: %s [%d corrupt so far]",
                        shard, index, key, reason, st["corrupt"])
        f = self.max_corrupt_fraction
        if f is not None and st["records"] >= self.min_records_for_check and st["corrupt"] > f * st["records"]:
            raise MLCDError(f"{shard}: {st['corrupt']} of {st['records']} samples read by this worker are "
                            f"corrupt, more than max_corrupt_fraction={f} (last: sample {index}, key {key}: {reason})")
