"""Reading an embeddings folder (``mlcd embed`` -> ``EMB/``) safely and in bounded memory.

Shared by ``mlcd cluster`` and ``mlcd assign``.  Every check raises an
:class:`~mlcd_core.errors.MLCDError` naming the file (and the shard and row for bad
values), before anything is written:

* ``EMB/meta.json`` missing or malformed, or naming a shard whose files are missing;
* a ``.npy`` whose header is unreadable, that is not 2-D float16/float32, or that is shorter
  than its header says (a truncated copy);
* keys (and ``.cls.npy`` when present) with a row count different from the embeddings;
* NaN/inf or zero-norm rows (found while streaming; the message names shard and row).

Rows are read with plain file reads (:func:`iter_chunks`, :func:`iter_raw_run`), never by
mapping a whole file, so the resident memory of a pass over the corpus is one chunk,
whatever its size.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from mlcd_core.errors import MLCDError
from mlcd_core.io import json_counts, json_field, load_json, open_regular, safe_np_load

META = "meta.json"


@dataclass
class NpyInfo:
    path: str
    shape: tuple
    dtype: np.dtype
    offset: int  # byte offset of the data
    fortran: bool


def npy_info(path: str | os.PathLike, what: str = "array") -> NpyInfo:
    """Header of a ``.npy`` file; MLCDError if missing, not a .npy, or truncated."""
    path = str(path)
    try:
        with open_regular(path, what=f"{what} file") as f:
            try:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            except (ValueError, EOFError, OSError) as exc:
                raise MLCDError(f"{path}: not a readable .npy {what} ({exc})") from None
            offset = f.tell()
    except FileNotFoundError:
        raise MLCDError(f"{path}: {what} file not found") from None
    if dtype.hasobject:
        raise MLCDError(f"{path}: {what} holds Python objects; only plain numeric/unicode arrays are accepted")
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = os.path.getsize(path)
    if size < need:
        raise MLCDError(f"{path}: truncated {what} ({size} bytes, header {shape} {dtype} needs {need})")
    return NpyInfo(path, tuple(shape), dtype, offset, fortran)


@dataclass
class EmbShard:
    name: str
    path: str       # EMB/<shard>.npy
    keys_path: str  # EMB/<shard>.keys.npy
    cls_path: str | None  # EMB/<shard>.cls.npy when present
    n: int
    d: int
    info: NpyInfo


@dataclass
class EmbFolder:
    root: str
    meta: dict
    shards: list[EmbShard]

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def embedder(self) -> str:
        return str(self.meta.get("embedder", ""))

    @property
    def total(self) -> int:
        return sum(s.n for s in self.shards)

    def offsets(self) -> np.ndarray:
        """Global row index of each shard's first row, plus the total at the end."""
        return np.concatenate([[0], np.cumsum([s.n for s in self.shards])]).astype(np.int64)

    def locate(self, global_row: int) -> tuple[EmbShard, int]:
        off = self.offsets()
        i = int(np.searchsorted(off, global_row, side="right") - 1)
        return self.shards[i], int(global_row - off[i])


def open_emb(root: str | os.PathLike, expect_embedder: str | None = None) -> EmbFolder:
    """Open and validate an EMB folder (headers, sizes, keys); reads no embedding values."""
    root = str(root)
    meta_path = os.path.join(root, META)
    if not os.path.isdir(root):
        raise MLCDError(f"{root}: embeddings folder not found")
    meta = load_json(meta_path)
    if not isinstance(meta, dict) or "dim" not in meta or "counts" not in meta:
        raise MLCDError(f"{meta_path}: not an embeddings meta.json (needs 'dim' and 'counts'; written by mlcd embed)")
    check_meta(meta, meta_path)
    if not meta.get("complete", True):
        raise MLCDError(f"{meta_path}: the embedding run in {root} did not finish (complete=false); rerun mlcd embed")
    if expect_embedder is not None and meta.get("embedder") != expect_embedder:
        raise MLCDError(f"{meta_path}: embeddings were made with {meta.get('embedder')!r}, "
                        f"not {expect_embedder!r} as asked")
    d = int(meta["dim"])
    shards = []
    for name, count in meta["counts"].items():  # names checked: plain file names in ``root``
        p = os.path.join(root, f"{name}.npy")
        info = npy_info(p, "embeddings")
        if len(info.shape) != 2 or info.dtype not in (np.float16, np.float32) or info.fortran:
            raise MLCDError(f"{p}: expected a C-order float16 [n, d] array, got {info.shape} {info.dtype}")
        if info.shape[1] != d:
            raise MLCDError(f"{p}: rows have dimension {info.shape[1]}, {meta_path} says {d}")
        if info.shape[0] != int(count):
            raise MLCDError(f"{p}: {info.shape[0]} rows, {meta_path} says {count}")
        kp = os.path.join(root, f"{name}.keys.npy")
        kinfo = npy_info(kp, "keys")
        if kinfo.shape != (info.shape[0],):
            raise MLCDError(f"{kp}: {kinfo.shape} keys for {info.shape[0]} embedding rows in {p}")
        cp = os.path.join(root, f"{name}.cls.npy")
        if os.path.exists(cp):
            cinfo = npy_info(cp, "classes")
            if cinfo.shape != (info.shape[0],):
                raise MLCDError(f"{cp}: {cinfo.shape} classes for {info.shape[0]} embedding rows in {p}")
        else:
            cp = None
        shards.append(EmbShard(name, p, kp, cp, info.shape[0], d, info))
    if not shards:
        raise MLCDError(f"{meta_path}: lists no shards")
    return EmbFolder(root, meta, shards)


def check_meta(meta: dict, path: str) -> dict:
    """Types of an embeddings meta.json (as :func:`write_meta` writes it): MLCDError naming the
    file and key for a value of another JSON type; shard names must be plain file names."""
    if json_field(meta, "dim", int, path) < 1:
        raise MLCDError(f"{path}: key 'dim' must be >= 1, found {meta['dim']}")
    json_counts(json_field(meta, "counts", dict, path), path, "counts")
    json_field(meta, "complete", bool, path, default=True)
    json_field(meta, "embedder", str, path, default="")
    json_field(meta, "embedder_info", dict, path, default=None, nullable=True)
    json_field(meta, "shards", str, path, default=None, nullable=True)
    return meta


def _row_problems(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows with NaN/inf, rows of zero norm) of a float32 chunk, in one pass over the values:
    a NaN or inf anywhere in a row makes its squared norm NaN or inf, so rows are looked at
    element by element only when some norm is not finite."""
    norms = np.einsum("ij,ij->i", x, x)
    if np.isfinite(norms).all():
        nonfinite = np.zeros(len(x), dtype=bool)
    else:
        nonfinite = ~np.isfinite(x).all(axis=1)
    return nonfinite, norms < 1e-12


def check_rows(x: np.ndarray, shard: EmbShard, start: int, rows: np.ndarray | None = None) -> None:
    """MLCDError naming shard and row for NaN/inf or zero-norm rows of a float32 chunk (``x``
    holds the chunk's rows ``rows`` when given, sorted, else all of them)."""
    nonfinite, zero = _row_problems(x)
    for bad, what in ((nonfinite, "NaN/inf values"), (zero, "zero norm")):
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            r = int(rows[r]) if rows is not None else r
            raise MLCDError(f"{shard.path}: row {start + r} (shard {shard.name}) has {what} "
                            f"({int(bad.sum())} such rows in this chunk)")


def read_raw(shard: EmbShard, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` as stored (float16), read with one seek + read."""
    info = shard.info
    count = (stop - start) * shard.d
    with open(shard.path, "rb") as f:
        f.seek(info.offset + start * shard.d * info.dtype.itemsize)
        a = np.fromfile(f, dtype=info.dtype, count=count)
    if a.size != count:  # the file shrank after validation
        raise MLCDError(f"{shard.path}: truncated while reading rows {start}:{stop}")
    return a.reshape(stop - start, shard.d)


def iter_raw_run(shards: list[EmbShard], chunk_rows: int):
    """(shard, start row, stored-dtype chunk) over every shard of a run, in order; ``mlcd
    assign`` iterates it through one :func:`prefetch` thread for the whole run, so the next
    shard's first chunk is read while this shard's last chunk is searched.

    Measured on the 2-core VM (500k x 256, 6 paired runs in alternating order): reading in
    the main thread between searches instead was no faster (whole command 0.89 vs 0.91 of raw
    faiss), and asking the kernel for more readahead (``posix_fadvise WILLNEED`` 8 or 64 MB
    ahead) no faster from a cold page cache; the thread also hides slow storage."""
    for sh in shards:
        for a in range(0, sh.n, chunk_rows):
            yield sh, a, read_raw(sh, a, min(sh.n, a + chunk_rows))


def to_f32(raw: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 copy of a float16/float32 [m, d] array, into ``out[:m]`` when given (reusing a
    buffer avoids page faults on a fresh allocation every chunk).

    float16 goes through torch's vectorised (F16C) conversion, 2.4x faster than numpy's on a
    warm chunk and 30 % faster between two faiss searches (bench numbers in the commit), in
    pieces below torch's parallel grain size: one thread, because waking torch's OpenMP pool
    leaves it spinning against faiss's threads during the next search (measured 9 % slower)."""
    m = raw.shape[0]
    x = np.empty(raw.shape, np.float32) if out is None else out[:m]
    if raw.dtype != np.float16 or not (raw.flags.c_contiguous and raw.flags.writeable):
        np.copyto(x, raw)
        return x
    import torch

    src = torch.from_numpy(raw.reshape(-1))
    dst = torch.from_numpy(x.reshape(-1))
    step = 32000  # < at::internal::GRAIN_SIZE (32768): copy_ stays on the calling thread
    for s in range(0, dst.numel(), step):
        dst[s: s + step].copy_(src[s: s + step])
    return x


def read_rows(shard: EmbShard, start: int, stop: int, check: bool = True) -> np.ndarray:
    """Rows ``start:stop`` of a shard as float32, validated (NaN, zero norm)."""
    x = to_f32(read_raw(shard, start, stop))
    if check:
        check_rows(x, shard, start)
    return x


def iter_chunks(shard: EmbShard, chunk_rows: int, check: bool = True) -> Iterator[tuple[int, np.ndarray]]:
    """(start row, float32 [m, d]) chunks of one shard, validated (NaN, zero norm)."""
    for start in range(0, shard.n, chunk_rows):
        yield start, read_rows(shard, start, min(shard.n, start + chunk_rows), check)


def gather(folder: EmbFolder, rows: np.ndarray, check: bool = True, chunk_rows: int = 1 << 16) -> np.ndarray:
    """Float32 rows at the sorted global indices ``rows`` (a training sample), validated."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), folder.dim), dtype=np.float32)
    off = folder.offsets()
    pos = 0
    for i, sh in enumerate(folder.shards):
        lo, hi = np.searchsorted(rows, [off[i], off[i + 1]])
        if hi == lo:
            continue
        local = rows[lo:hi] - off[i]
        if hi - lo == sh.n:  # the whole shard: sequential reads
            for start, x in iter_chunks(sh, chunk_rows, check):
                out[pos + start: pos + start + len(x)] = x
        else:
            mm = safe_np_load(sh.path, "embeddings", mmap_mode="r")
            for s in range(0, len(local), chunk_rows):
                idx = local[s: s + chunk_rows]
                x = np.asarray(mm[idx], dtype=np.float32)
                if check:
                    bad_shard_rows = _first_bad(x)
                    if bad_shard_rows is not None:
                        check_rows(x[bad_shard_rows: bad_shard_rows + 1], sh, int(idx[bad_shard_rows]))
                out[pos + s: pos + s + len(x)] = x
            del mm
        pos += hi - lo
    return out


def _first_bad(x: np.ndarray) -> int | None:
    nonfinite, zero = _row_problems(x)
    bad = nonfinite | zero
    return int(np.flatnonzero(bad)[0]) if bad.any() else None


def copy_keys(shard: EmbShard, dest: str) -> None:
    """Put a shard's keys file at ``dest`` atomically: a hard link when EMB and ``dest`` share a
    filesystem (no bytes written: keys are UTF-32, often the largest file of a shard), else a
    byte-for-byte copy.  Either way the strings are not decoded and re-encoded.  EMB files are
    only ever replaced by rename, never rewritten in place, so the link keeps the keys this
    run read even if EMB is redone later.  Header and size were validated by
    :func:`open_emb`; checked again here in case the file changed since."""
    import shutil

    from mlcd_core.io import atomic_open, tmp_path_for

    info = npy_info(shard.keys_path, "keys")
    if info.shape != (shard.n,):
        raise MLCDError(f"{shard.keys_path}: {info.shape} keys for {shard.n} embedding rows in {shard.path}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(dest)  # (rename onto a link of the same file would be a no-op, leaving tmp)
    tmp = tmp_path_for(dest)
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.link(shard.keys_path, tmp)
    except OSError:  # another filesystem, or one without hard links
        with open(shard.keys_path, "rb") as src, atomic_open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return
    os.replace(tmp, dest)


def load_cls(shard: EmbShard) -> np.ndarray | None:
    if shard.cls_path is None:
        return None
    return safe_np_load(shard.cls_path, "classes").astype(np.int64)


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)


def shard_names_for_rank(names: list, rank: int, world: int) -> list:
    """Shards of one rank: round-robin, so ranks get balanced, disjoint, complete subsets."""
    return list(names[rank::world])


def resolve(p: str | os.PathLike) -> str:
    return str(Path(p).resolve())


# ------------------------------------------------------------------------------- writing

def run_difference(old: dict, now: dict, only_recorded: bool = False) -> str:
    """'' when the run recorded in ``old`` (a meta.json) is the one ``now`` describes, else
    "differs in a, b: a=<old a>, b=<old b>" for the error refusing to mix the two.  ``now`` is
    compared as JSON (tuples become lists); with ``only_recorded`` keys that ``old`` lacks
    (a meta.json written before they were recorded) are not compared."""
    import json

    now = json.loads(json.dumps(now))
    keys = [k for k, v in now.items() if (k in old or not only_recorded) and old.get(k) != v]
    return f"differs in {', '.join(keys)}: {', '.join(f'{k}={old.get(k)!r}' for k in keys)}" if keys else ""


def array_fingerprint(a: np.ndarray) -> str:
    """Content fingerprint of an array (dtype, shape, bytes): tells a rerun whether the centres
    behind a path are still the ones its finished shards were labelled with."""
    import hashlib

    a = np.ascontiguousarray(a)
    h = hashlib.blake2b(f"{a.dtype.str}{a.shape}".encode(), digest_size=16)
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def file_fingerprint(path: str | os.PathLike) -> str | None:
    """Content fingerprint of a weights file, or of the weight files of a model folder
    (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``, ``*.npz``); None when ``path`` is
    neither (a pretrained tag, say).  Read in 8 MB blocks: seconds for a ViT-L checkpoint,
    once per run."""
    import hashlib

    path = str(path)
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.endswith((".safetensors", ".bin", ".pt", ".pth", ".npz")))
    else:
        return None
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        h.update(os.path.basename(f).encode() + b"\0")
        with open_regular(f, what="weights file") as fh:  # a FIFO named x.pt would block
            while block := fh.read(8 << 20):
                h.update(block)
    return h.hexdigest()


def shard_done(root: str | os.PathLike, name: str) -> bool:
    """True when EMB/<shard>.npy and its keys exist, are readable and agree (a finished shard)."""
    try:
        info = npy_info(os.path.join(root, f"{name}.npy"))
        kinfo = npy_info(os.path.join(root, f"{name}.keys.npy"))
    except MLCDError:
        return False
    return len(info.shape) == 2 and kinfo.shape == (info.shape[0],)


def write_shard(root: str | os.PathLike, name: str, emb: np.ndarray, keys, cls=None) -> None:
    """Write one shard's rows: L2-normalised float16 embeddings, keys, classes (-1 unknown).

    The keys file is written last: its presence with a matching row count marks the shard
    finished (:func:`shard_done`).
    """
    from mlcd_core.io import atomic_save_npy

    emb = np.asarray(emb, dtype=np.float32)
    keys = np.asarray(keys, dtype=np.str_)
    if emb.ndim != 2 or len(keys) != len(emb):
        raise ValueError(f"{name}: {emb.shape} embeddings for {len(keys)} keys")
    atomic_save_npy(os.path.join(root, f"{name}.npy"), normalise(emb).astype(np.float16))
    if cls is not None:
        atomic_save_npy(os.path.join(root, f"{name}.cls.npy"), np.asarray(cls, dtype=np.int32))
    else:  # a redone shard without classes must not keep another run's
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(root, f"{name}.cls.npy"))
    atomic_save_npy(os.path.join(root, f"{name}.keys.npy"), keys)


def write_meta(root: str | os.PathLike, embedder: str, dim: int, counts: dict, complete: bool = True,
               **extra) -> None:
    """EMB/meta.json: embedder spec, dim, per-shard row counts in shard order, total."""
    from mlcd_core.io import atomic_save_json

    atomic_save_json(os.path.join(root, META),
                     {"embedder": embedder, "dim": int(dim), "dtype": "float16", "normalised": True,
                      "complete": bool(complete), "total": int(sum(counts.values())),
                      "counts": {k: int(v) for k, v in counts.items()}, **extra})


def prefetch(iterable, depth: int = 1):
    """Iterate ``iterable`` in a background thread, ``depth`` items ahead (file reads overlap
    the search, which releases the GIL).  Exceptions are re-raised here."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in iterable:
                if stop.is_set():
                    return
                q.put(("item", item))
            q.put(("end", done))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(("error", exc))

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)
