"""``mlcd shards``: convert an image corpus into WebDataset tar shards.

Sources (``--format auto`` guesses from ``--input``):

- ``folder``: an image folder, read recursively.  An image inside a first-level subfolder
  gets that subfolder's name as its ground-truth class (evaluation only); images at the top
  level have no class.  Hidden files and folders (``.name``) are ignored.  Symbolic links to
  folders are followed; a folder reached a second time (a link loop) is skipped and reported.
- ``idx``: an MNIST / Fashion-MNIST IDX images file (``.gz`` or raw).  Its labels file is
  found beside it by name (``train-images-idx3-ubyte.gz`` -> ``train-labels-idx1-ubyte.gz``);
  a ``classes.json`` (``{"0": "name", ...}``) beside it gives class names.  Pixels ([n, h, w]
  or [n, h, w, c] with c = 1, 3 or 4) are stored as PNG.
- ``list``: a text file with ``path`` or ``path<TAB>class`` per line (relative paths are
  relative to the list file; blank lines and ``#`` comments are ignored).  Classes that are
  all integers are used as ids; otherwise names are numbered in sorted order.  Every path
  must lie inside the list file's folder (or ``--list-root DIR``): others are skipped and
  reported, never read.
- ``sample`` / ``sample:test``: the shipped Fashion-MNIST sample (train / test split);
  ``fashion-mnist`` / ``fashion-mnist:test``: the full set of the Debian package
  ``dataset-fashion-mnist``.

Each input numbers its own class names, so a split lacking a class gets other ids: ``--classes
PATH`` numbers them by a ``classes.json`` of another split (e.g. the training split's output);
a class not in that file is an error.

Output in ``--out DIR`` (see docs/architecture.md, "Shards"):

- ``PREFIX-000000.tar`` ...: one sample = ``KEY.<ext>`` (the image file's bytes as they are,
  extension from its real format) + ``KEY.cls`` (decimal class id) when the class is known.
  Keys are the source path without its extension (``/`` kept, other odd characters -> ``_``),
  or ``<split>_<index>`` for IDX files; they are unique and stable.
- ``sizes.json`` (shard -> sample count, written last), ``skipped.json`` (every skipped input
  with the reason), ``classes.json`` (class id -> name, when names are known).

Every image is decoded once to check it: an empty, unreadable, truncated or non-image file
is skipped and reported, never fatal; so is anything but a regular file (a FIFO, a link to a
device) and a file over 512 MB, neither of which is read.  Images above ``--max-image-pixels`` are skipped too
(decompression bombs).  The same input and options give byte-identical shards (fixed order,
fixed tar metadata).  Each shard is written to a temporary name and renamed when complete;
an interrupted run started again with the same input and options resumes after the last
complete shard.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import struct
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from mlcd_core.errors import MLCDError
from mlcd_core.args import nonneg_int, positive_int
from mlcd_core.io import (UnsafeFile, atomic_open, atomic_save_json, check_name, check_out_separate, inside,
                                 json_field, load_json, open_regular, read_regular, remove_stale_tmp)
from mlcd_core.lock import output_lock
from mlcd_core.progress import progress

#: file extensions treated as images when reading a folder or a list file
IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm"}
#: tar member extension for each PIL format (the image's real format, not its file name)
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif",
              "TIFF": "tiff", "PPM": "ppm", "MPO": "jpg"}
#: PIL's own default; an image with more pixels is skipped (0 disables the bound)
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
DEFAULT_SHARD_SIZE = 10_000
DEFAULT_MAX_BYTES = 1_000_000_000
TAR_MTIME = 0  # fixed tar metadata -> byte-identical shards
PROGRESS_FILE = ".shards-progress.json"
#: an image file larger than this is skipped unread (PIL's pixel bound applies after decoding)
MAX_IMAGE_FILE_BYTES = 512 << 20
#: an IDX file whose header declares more data than this is refused before it is decompressed
MAX_IDX_BYTES = 4 << 30
#: a list file larger than this is refused unread
MAX_LIST_BYTES = 1 << 30

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class _Skip(Exception):
    """An input that is skipped (the message is the reason)."""


@dataclass
class Item:
    """One input sample: ``load()`` returns (tar extension, image bytes) or raises _Skip."""
    key: str
    cls: Optional[int]
    source: str  # shown in skipped.json / the summary
    load: Callable[[], tuple[str, bytes]]
    stamp: str = ""  # size/mtime of a file, for the resume signature


# ----------------------------------------------------------------------------- IDX

def read_idx(path: str | os.PathLike, max_bytes: int | None = None) -> np.ndarray:
    """Read an IDX file (MNIST format, gzip or raw) into a numpy array.

    Only a regular file is read.  The header is read first: a file declaring more than
    ``max_bytes`` (default :data:`MAX_IDX_BYTES`) of data is refused, and a gzip file is
    decompressed as a stream that stops one byte past what the header declares, so a small
    file expanding to gigabytes (a gzip bomb) is never held in memory."""
    path = Path(path)
    limit = MAX_IDX_BYTES if max_bytes is None else max_bytes
    try:
        with open_regular(path, what="IDX file") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            f = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
            try:
                head = f.read(4)
                if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
                    raise MLCDError(f"{path}: not an IDX file (bad magic number)")
                ndim = head[3]
                dims = f.read(4 * ndim)
                if ndim == 0 or len(dims) < 4 * ndim:
                    raise MLCDError(f"{path}: not an IDX file (bad header)")
                shape = struct.unpack(f">{ndim}I", dims)
                dtype = np.dtype(_IDX_DTYPES[head[2]])
                expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if expected > limit:
                    raise MLCDError(f"{path}: IDX header declares {shape} {dtype} ({expected} bytes), over the "
                                    f"limit of {limit} bytes; refused before reading it")
                if not gz:
                    size = os.fstat(raw.fileno()).st_size
                    if size != 4 + 4 * ndim + expected:
                        raise MLCDError(f"{path}: truncated or oversized IDX file ({size - 4 - 4 * ndim} bytes "
                                        f"of data, header {shape} needs {expected})")
                body = f.read(expected + 1)  # one byte more tells an oversized file
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                if not gz:
                    raise
                raise MLCDError(f"{path}: corrupt gzip file ({exc})") from None
    except UnsafeFile:
        raise
    except OSError as exc:
        raise MLCDError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(body) != expected:
        raise MLCDError(f"{path}: truncated or oversized IDX file ({len(body)}{'+' if len(body) > expected else ''} "
                        f"bytes of data, header {shape} needs {expected})")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def idx_bytes(array: np.ndarray, compress: bool = True) -> bytes:
    """An unsigned-byte IDX file for ``array`` (gzip with mtime 0, so byte-identical, unless ``compress=False``)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    raw = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    return gzip.compress(raw, compresslevel=9, mtime=0) if compress else raw


def idx_labels_path(images: Path) -> Optional[Path]:
    """The labels file beside an IDX images file, found by name; None when there is none."""
    name = images.name
    candidates = []
    if "images" in name:
        candidates.append(name.replace("images", "labels").replace("idx3", "idx1"))
        candidates.append(name.replace("images", "labels"))
    for cand in candidates:
        for variant in (cand, cand[:-3] if cand.endswith(".gz") else cand + ".gz"):
            p = images.with_name(variant)
            if p != images and p.is_file():
                return p
    return None


def _is_idx_file(path: Path) -> bool:
    if re.search(r"idx\d-ubyte(\.gz)?$", path.name):
        return True
    try:
        with open_regular(path, what="file") as f:
            head = f.read(4)
    except (OSError, UnsafeFile):
        return False
    return len(head) == 4 and head[:2] == b"\0\0" and head[2] in _IDX_DTYPES and 1 <= head[3] <= 4


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def _idx_items(images_path: Path, class_names: Optional[dict] = None) -> tuple[list[Item], Optional[dict]]:
    images = read_idx(images_path)
    if images.ndim not in (3, 4) or images.dtype != np.uint8:
        raise MLCDError(f"{images_path}: expected unsigned-byte images [n, h, w] or [n, h, w, c], "
                        f"got {images.dtype} {images.shape}")
    if images.ndim == 4:
        if images.shape[3] == 1:
            images = images[..., 0]  # grey: PIL has no [h, w, 1] mode
        elif images.shape[3] not in (3, 4):
            raise MLCDError(f"{images_path}: {images.shape[3]} channels per pixel in {images.shape}; "
                            "expected 1 (grey), 3 (RGB) or 4 (RGBA)")
    labels_path = idx_labels_path(images_path)
    labels = None
    if labels_path is not None:
        labels = read_idx(labels_path)
        if labels.ndim != 1 or len(labels) != len(images):
            raise MLCDError(f"{labels_path}: {labels.shape} labels for {len(images)} images "
                            f"in {images_path}")
    else:
        print(f"mlcd shards: no labels file beside {images_path}; samples get no class", file=sys.stderr)
    if class_names is None:
        beside = images_path.with_name("classes.json")
        if beside.is_file():
            class_names = load_classes(beside)[1]
    stem = re.split(r"[-_.]images", images_path.name)[0] or "idx"
    stem = _sanitize(stem)
    width = max(6, len(str(len(images) - 1)))
    stamp = _stamp(images_path) + (("," + _stamp(labels_path)) if labels_path else "")
    items = []
    for i in range(len(images)):
        cls = int(labels[i]) if labels is not None else None
        items.append(Item(key=f"{stem}_{i:0{width}d}", cls=cls, source=f"{images_path}[{i}]",
                          load=(lambda i=i: ("png", _png_bytes(images[i]))), stamp=stamp))
    return items, class_names


# ----------------------------------------------------------------------------- files

def _sanitize(text: str) -> str:
    text = re.sub(r"[^A-Za-z0-9_\-/]", "_", text).strip("/")
    return re.sub(r"/+", "/", text) or "_"


def _file_loader(path: Path) -> Callable[[], tuple[str, bytes]]:
    def load():
        try:  # a FIFO, a device (a link to /dev/zero) or a huge file is skipped, never read
            data = read_regular(path, MAX_IMAGE_FILE_BYTES, "image file")
        except UnsafeFile as exc:
            raise _Skip(exc.reason) from None
        except OSError as exc:
            raise _Skip(f"unreadable file ({exc.strerror or exc})") from None
        return path.suffix.lower().lstrip("."), data
    return load


def _stamp(path: Path) -> str:
    try:
        st = path.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return "?"


def _unique_keys(raw: list[str]) -> list[str]:
    """Make keys unique in listing order: a repeated key gets ``_2``, ``_3``, ..."""
    seen: set[str] = set()
    out = []
    for k in raw:
        key, n = k, 1
        while key in seen:
            n += 1
            key = f"{k}_{n}"
        seen.add(key)
        out.append(key)
    return out


def load_classes(path: str | os.PathLike) -> tuple[Path, dict]:
    """(path, {id: name}) from a ``classes.json`` (``{"0": "name", ...}``) given with ``--classes``."""
    path = Path(path).expanduser()
    data = load_json(path)
    if (not isinstance(data, dict) or not data
            or not all(re.fullmatch(r"-?\d+", str(k)) and isinstance(v, str) for k, v in data.items())):
        raise MLCDError(f"{path}: expected a classes.json ({{\"0\": \"name\", ...}}, written by mlcd shards)")
    names = {int(k): v for k, v in data.items()}
    if len(set(names.values())) != len(names):
        raise MLCDError(f"{path}: a class name appears twice")
    return path, names


def _given_id(given: tuple[Path, dict], name: str, where: Path) -> int:
    """The id of class ``name`` in the ``--classes`` file; an unknown name is an MLCDError."""
    path, names = given
    for i, n in names.items():
        if n == name:
            return i
    raise MLCDError(f"{path}: has no class {name!r} (found in {where}); the --classes file must list "
                    "every class of the input")


def _folder_items(root: Path, skipped: list, given: Optional[tuple[Path, dict]] = None
                  ) -> tuple[list[Item], Optional[dict]]:
    files: list[Path] = []
    # symlinked folders are followed; a folder already read (a link loop or a second link to
    # it) is skipped and reported, so no image is read twice under two keys
    seen = {os.path.realpath(root): str(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=lambda e: skipped.append(
            {"path": str(e.filename), "reason": f"unreadable folder ({e.strerror})"})):
        keep = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            path = os.path.join(dirpath, d)
            real = os.path.realpath(path)
            if real in seen:
                skipped.append({"path": path, "reason": f"folder already read as {seen[real]} (symbolic link)"})
            else:
                seen[real] = path
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            if not name.startswith("."):
                files.append(Path(dirpath) / name)
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    images = []
    for p in files:
        if p.suffix.lower().lstrip(".") in IMAGE_EXTS:
            images.append(p)
        else:
            skipped.append({"path": str(p), "reason": "not an image file extension"})
    rels = [p.relative_to(root) for p in images]
    class_dirs = sorted({r.parts[0] for r in rels if len(r.parts) > 1})
    if given is not None:
        class_ids = {name: _given_id(given, name, root / name) for name in class_dirs}
        names = given[1]
    else:
        class_ids = {name: i for i, name in enumerate(class_dirs)}
        names = {i: n for n, i in class_ids.items()} if class_ids else None
    keys = _unique_keys([_sanitize(r.with_suffix("").as_posix()) for r in rels])
    items = [Item(key=k, cls=class_ids[r.parts[0]] if len(r.parts) > 1 else None, source=str(p),
                  load=_file_loader(p), stamp=_stamp(p))
             for k, r, p in zip(keys, rels, images)]
    return items, names


def _list_items(list_path: Path, skipped: list, given: Optional[tuple[Path, dict]] = None,
                root: Optional[Path] = None) -> tuple[list[Item], Optional[dict]]:
    """Items of a list file.  Every entry must lie inside ``root`` (default: the list file's
    folder), judged on the path as written, normalised: an entry outside it (``../x``,
    ``/etc/x``) is skipped and reported, never read."""
    try:
        text = read_regular(list_path, MAX_LIST_BYTES, "list file").decode("utf-8")
    except UnsafeFile:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise MLCDError(f"{list_path}: cannot read list file ({exc})") from None
    root = Path(os.path.normpath(os.path.abspath(root if root is not None else list_path.parent)))
    entries = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) > 2:
            raise MLCDError(f"{list_path}:{lineno}: expected 'path' or 'path<TAB>class', got {len(parts)} fields")
        if "\0" in parts[0]:
            raise MLCDError(f"{list_path}:{lineno}: NUL character in a path")
        p = Path(parts[0].strip())
        if not p.is_absolute():
            p = list_path.parent / p
        p = Path(os.path.normpath(os.path.abspath(p)))
        entries.append((p, parts[1].strip() if len(parts) == 2 and parts[1].strip() else None))
    classes = [c for _, c in entries if c is not None]
    names = None
    if classes and all(re.fullmatch(r"-?\d+", c) for c in classes):
        to_id = {c: int(c) for c in classes}
        if given is not None:  # ids as they are; --classes names them
            for c in classes:
                if int(c) not in given[1]:
                    raise MLCDError(f"{given[0]}: has no class id {c} (used in {list_path})")
            names = given[1]
    elif given is not None:
        to_id = {c: _given_id(given, c, list_path) for c in set(classes)}
        names = given[1]
    else:
        ordered = sorted(set(classes))
        to_id = {c: i for i, c in enumerate(ordered)}
        names = {i: c for c, i in to_id.items()} if ordered else None
    raw_keys = []
    for p, _ in entries:
        try:
            rel = p.relative_to(list_path.parent)
        except ValueError:
            rel = p
        raw_keys.append(_sanitize(rel.with_suffix("").as_posix()))
    items = []
    for key, (p, c) in zip(_unique_keys(raw_keys), entries):
        loader = _file_loader(p)
        if not (inside(p, root) or inside(os.path.realpath(p), os.path.realpath(root))):
            loader = _skip_loader(f"outside {root} (list entries must stay inside the list file's folder "
                                  "or --list-root)")
        elif p.suffix.lower().lstrip(".") not in IMAGE_EXTS:
            loader = _skip_loader("not an image file extension")
        elif not p.is_file():
            loader = _skip_loader("file not found" if not p.exists() else "not a regular file")
        items.append(Item(key=key, cls=to_id[c] if c is not None else None, source=str(p),
                          load=loader, stamp=_stamp(p)))
    return items, names


def _skip_loader(reason: str):
    def load():
        raise _Skip(reason)
    return load


# ----------------------------------------------------------------------------- checks

def check_image(data: bytes) -> str:
    """Decode ``data`` fully; returns its PIL format or raises _Skip with the reason."""
    from PIL import Image

    if not data:
        raise _Skip("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
                im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _Skip(f"image too large ({exc})") from None
        except Image.UnidentifiedImageError:
            raise _Skip("not an image (unidentified format)") from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
            raise _Skip(f"corrupt or truncated image ({exc})") from None
        except Exception as exc:  # e.g. a TypeError from a malformed TIFF tag: one bad file is never fatal
            raise _Skip(f"corrupt image ({type(exc).__name__}: {exc})") from None
    return fmt


# ----------------------------------------------------------------------------- source

def resolve_input(spec: str, fmt: str) -> tuple[str, Path, Optional[dict]]:
    """(format, path, known class names) for ``--input`` / ``--format``."""
    from mlcd_train.data.sample import CLASS_NAMES, fashion_mnist_full_paths, sample_paths

    path = Path(spec).expanduser()
    if not path.exists():
        alias, _, split = spec.partition(":")
        if alias in ("sample", "fashion-mnist"):
            finder = sample_paths if alias == "sample" else fashion_mnist_full_paths
            images, _ = finder(split or "train")
            return "idx", images, dict(enumerate(CLASS_NAMES))
        raise MLCDError(f"{spec}: input not found")
    if fmt == "auto":
        if path.is_dir():
            fmt = "folder"
        elif _is_idx_file(path):
            fmt = "idx"
        elif path.suffix.lower().lstrip(".") in IMAGE_EXTS:
            raise MLCDError(f"{path}: a single image is not a corpus; give its folder or a list file")
        else:
            fmt = "list"
    if fmt == "folder" and not path.is_dir():
        raise MLCDError(f"{path}: --format folder needs a folder")
    if fmt in ("idx", "list") and not path.is_file():
        raise MLCDError(f"{path}: --format {fmt} needs a file")
    return fmt, path.resolve(), None


def collect_items(fmt: str, path: Path, names: Optional[dict], skipped: list,
                  given: Optional[tuple[Path, dict]] = None, list_root: Optional[Path] = None
                  ) -> tuple[list[Item], Optional[dict]]:
    """Items and class names; ``given`` = ``load_classes(--classes)`` numbers the classes."""
    if fmt == "idx":
        return _idx_items(path, given[1] if given is not None else names)
    if fmt == "folder":
        return _folder_items(path, skipped, given)
    return _list_items(path, skipped, given, list_root)


# ----------------------------------------------------------------------------- writer

class _ShardSink:
    """Writes samples with webdataset's TarWriter into PREFIX-NNNNNN.tar, one temp file + rename per shard."""

    def __init__(self, out: Path, prefix: str, shard_size: int, max_bytes: int, start_shard: int = 0,
                 on_shard_done: Optional[Callable[[str, int], None]] = None):
        self.out, self.prefix = out, prefix
        self.shard_size, self.max_bytes = shard_size, max_bytes
        self.shard = start_shard
        self.on_shard_done = on_shard_done
        self._cm = self._file = self._tar = None
        self.count = self.bytes = 0

    def _open(self):
        import webdataset as wds

        name = f"{self.prefix}-{self.shard:06d}.tar"
        self._name = name
        self._cm = atomic_open(self.out / name, "wb")
        self._file = self._cm.__enter__()
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=TAR_MTIME, user="mlcd", group="mlcd",
                                  mode=0o444)
        self.count = self.bytes = 0

    def _close(self):
        if self._tar is None:
            return
        self._tar.close()  # writes the tar end blocks; the file itself stays open
        self._tar = None
        self._cm.__exit__(None, None, None)  # fsync + rename over the final name
        self._cm = self._file = None
        self.shard += 1
        if self.on_shard_done:
            self.on_shard_done(self._name, self.count)

    def write(self, sample: dict, nbytes: int) -> None:
        if self._tar is not None and (self.count >= self.shard_size
                                      or (self.count > 0 and self.bytes + nbytes > self.max_bytes)):
            self._close()
        if self._tar is None:
            self._open()
        self.bytes += self._tar.write(sample) + 512 * (len(sample) - 1)
        self.count += 1

    def close(self):
        self._close()

    def abort(self):
        if self._tar is not None:  # drop the half-written tar: keep tarfile from flushing it later
            self._tar.tarstream.closed = True
            stream = getattr(self._tar.tarstream, "fileobj", None)
            if hasattr(stream, "closed"):
                stream.closed = True
        if self._cm is not None:
            with contextlib.suppress(Exception):
                self._cm.__exit__(RuntimeError, RuntimeError("aborted"), None)  # removes the temp file
        self._cm = self._file = self._tar = None


def _signature(args, fmt: str, path: Path, items: list[Item]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([fmt, str(path), args.shard_size, args.max_bytes, args.prefix, args.order, args.seed,
                         args.max_image_pixels]).encode())
    for it in items:
        h.update(f"{it.key}\t{it.cls}\t{it.stamp}\n".encode())
    return h.hexdigest()


def _remove_old_shards(out: Path, prefix: str, keep: set) -> None:
    """Delete PREFIX-NNNNNN.tar shards not in ``keep`` (those of an earlier run, --overwrite)."""
    for old in out.glob(f"{prefix}-*.tar"):
        if old.name not in keep and re.fullmatch(re.escape(prefix) + r"-\d{6}\.tar", old.name):
            with contextlib.suppress(FileNotFoundError):
                old.unlink()


def _read_progress(path: Path, prefix: str) -> dict:
    """The progress file of an interrupted run, its types and shard names checked (an
    MLCDError names the file and key): names are this run's PREFIX-NNNNNN.tar, nothing else."""
    state = load_json(path, expect=dict)
    json_field(state, "signature", str, path)
    shards = json_field(state, "shards", list, path)
    for d in shards:
        if not isinstance(d, dict):
            raise MLCDError(f"{path}: key 'shards' should hold objects {{name, count, consumed}}")
        name = check_name(json_field(d, "name", str, path), path, "shard name")
        if not re.fullmatch(re.escape(prefix) + r"-\d{6}\.tar", name):
            raise MLCDError(f"{path}: shard name {name!r} is not a {prefix}-NNNNNN.tar of this run")
        for key in ("count", "consumed"):
            if json_field(d, key, int, path) < 0:
                raise MLCDError(f"{path}: key {key!r} of {name} is negative")
    for d in json_field(state, "skipped", list, path):
        if not isinstance(d, dict):
            raise MLCDError(f"{path}: key 'skipped' should hold objects {{path, reason}}")
    return state


def write_shards(args) -> dict:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = args.max_image_pixels or None
    out = Path(args.out)
    fmt, path, names = resolve_input(args.input, args.format)
    # the shards, sizes.json, classes.json and temporaries go to --out: never into the folder
    # an input is read from (a folder input: nor anywhere below it, it is read recursively)
    check_out_separate("--out", out, [("--input", path), ("--classes", getattr(args, "classes", None))],
                       recursive=("--input",) if fmt == "folder" else ())
    with output_lock(out, "shards"):  # one run at a time into this output (issue 15)
        given = load_classes(args.classes) if getattr(args, "classes", None) else None
        listing_skipped: list[dict] = []
        list_root = getattr(args, "list_root", None)
        items, names = collect_items(fmt, path, names, listing_skipped, given,
                                     Path(list_root).expanduser() if list_root else None)
        if not items:
            raise MLCDError(f"{path}: no image files found" + (
                f" ({len(listing_skipped)} other files, e.g. {listing_skipped[0]['path']})" if listing_skipped else ""))
        if args.order == "shuffled":
            perm = np.random.default_rng(args.seed).permutation(len(items))
            items = [items[i] for i in perm]

        if (out / "sizes.json").exists() and not args.overwrite:
            raise MLCDError(f"{out}: already holds shards (sizes.json); pass --overwrite to replace them")
        sig = _signature(args, fmt, path, items)
        done, skipped, start = [], list(listing_skipped), 0
        progress_path = out / PROGRESS_FILE
        if progress_path.exists() and not (out / "sizes.json").exists():
            state = _read_progress(progress_path, args.prefix)
            if state.get("signature") == sig and all((out / d["name"]).is_file() for d in state["shards"]):
                done, skipped = state["shards"], state["skipped"]
                start = done[-1]["consumed"] if done else 0
                print(f"mlcd shards: resuming after {len(done)} complete shards ({start} inputs done)", file=sys.stderr)
        if not done and not args.overwrite and any(out.glob(f"{args.prefix}-*.tar")):
            raise MLCDError(f"{out}: holds {args.prefix}-*.tar shards of another or unfinished run; "
                            "pass --overwrite to replace them")
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(out)
        cleared = False

        def clear_earlier_run():
            # before the first shard is written: the earlier run's metadata, sizes.json first (it
            # marks a complete folder), and its other shards, so that an interrupted --overwrite
            # never leaves a folder that looks complete or mixes two runs
            nonlocal cleared
            if not cleared:
                for meta in ("sizes.json", "skipped.json", "classes.json"):
                    with contextlib.suppress(FileNotFoundError):
                        (out / meta).unlink()
                _remove_old_shards(out, args.prefix, {d["name"] for d in done})
                cleared = True

        pending_skips: list[dict] = []
        consumed = start

        def shard_done(name, count):
            done.append({"name": name, "count": count, "consumed": consumed})
            skipped.extend(pending_skips)
            pending_skips.clear()
            atomic_save_json(progress_path, {"signature": sig, "shards": done, "skipped": skipped})

        sink = _ShardSink(out, args.prefix, args.shard_size, args.max_bytes, start_shard=len(done),
                          on_shard_done=shard_done)
        try:
            for item in progress(items[start:], total=len(items) - start, desc="shards", unit="img"):
                try:
                    ext, data = item.load()
                    real = check_image(data)
                    ext = FORMAT_EXT.get(real, ext or "img")
                except _Skip as exc:
                    pending_skips.append({"path": item.source, "reason": str(exc)})
                    consumed += 1
                    continue
                sample = {"__key__": item.key, ext: data}
                if item.cls is not None:
                    sample["cls"] = str(item.cls).encode("ascii")
                # the item is counted as consumed before the write so that a shard closed by
                # this write records the inputs it holds, not this one
                clear_earlier_run()
                sink.write(sample, len(data) + 1024)
                consumed += 1
            sink.close()
        except BaseException:
            sink.abort()
            raise
        skipped.extend(pending_skips)
        n_written = sum(d["count"] for d in done)
        if n_written == 0:
            with contextlib.suppress(FileNotFoundError):
                progress_path.unlink()
            reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:5])
            raise MLCDError(f"{path}: no valid image among {len(items)} inputs ({reasons}"
                            + (", ..." if len(skipped) > 5 else "") + ")")

        clear_earlier_run()
        atomic_save_json(out / "skipped.json", skipped)
        if names:
            atomic_save_json(out / "classes.json", {str(k): v for k, v in sorted(names.items())})
        sizes = {d["name"]: d["count"] for d in done}
        atomic_save_json(out / "sizes.json", sizes)
        with contextlib.suppress(FileNotFoundError):
            progress_path.unlink()
        return {"out": str(out), "shards": len(sizes), "samples": n_written, "skipped": skipped}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mlcd shards", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert an image folder, IDX files or a list file into WebDataset tar shards.",
        epilog=__doc__.split("\n", 2)[2].replace("``", ""))
    ap.add_argument("--input", required=True, metavar="SRC",
                    help="image folder, IDX images file, list file, or 'sample[:test]' / 'fashion-mnist[:test]'")
    ap.add_argument("--out", required=True, metavar="DIR", help="output folder for the shards")
    ap.add_argument("--format", choices=["auto", "folder", "idx", "list"], default="auto",
                    help="input format (default: guessed from SRC)")
    ap.add_argument("--shard-size", type=positive_int, default=DEFAULT_SHARD_SIZE, metavar="N",
                    help=f"samples per shard (default {DEFAULT_SHARD_SIZE})")
    ap.add_argument("--max-bytes", type=positive_int, default=DEFAULT_MAX_BYTES, metavar="B",
                    help=f"start a new shard before one would exceed B bytes (default {DEFAULT_MAX_BYTES})")
    ap.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")
    ap.add_argument("--order", choices=["shuffled", "sorted"], default="shuffled",
                    help="sample order in the shards: a seeded shuffle (default; class folders get mixed) "
                         "or the source order (sorted paths / IDX order / list order)")
    ap.add_argument("--seed", type=nonneg_int, default=0, help="seed of --order shuffled (default 0)")
    ap.add_argument("--max-image-pixels", type=nonneg_int, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="P",
                    help=f"skip images with more than P pixels (PIL.Image.MAX_IMAGE_PIXELS; default "
                         f"{DEFAULT_MAX_IMAGE_PIXELS}, 0 = no bound).  The reader keeps Pillow's default, "
                         f"which refuses images above {2 * DEFAULT_MAX_IMAGE_PIXELS} pixels: with a larger P "
                         f"such images would count as corrupt samples in training")
    ap.add_argument("--overwrite", action="store_true", help="replace the shards already in DIR")
    ap.add_argument("--classes", default=None, metavar="PATH",
                    help="number classes by this classes.json (e.g. the training split's), so that every "
                         "split gets the same ids; a class not in it is an error")
    ap.add_argument("--list-root", default=None, metavar="DIR",
                    help="list input: entries must lie inside DIR (default: the list file's folder); "
                         "entries outside it are skipped and reported, never read")
    return ap


@dataclass
class ShardsResult:
    """What :func:`make_shards` returns: the shard folder ``out``, ``shards`` written,
    ``samples`` in them, and the ``skipped`` inputs ({path, reason}, as skipped.json lists them)."""

    out: str
    shards: int
    samples: int
    skipped: list


def make_shards(input: str, out: str, *, format: str = "auto", shard_size: int = DEFAULT_SHARD_SIZE,
                max_bytes: int = DEFAULT_MAX_BYTES, prefix: str = "shard", order: str = "shuffled", seed: int = 0,
                max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, overwrite: bool = False,
                classes: Optional[str] = None, list_root: Optional[str] = None) -> ShardsResult:
    """``mlcd shards``: an image folder, IDX images file, list file or ``sample[:test]`` /
    ``fashion-mnist[:test]`` (``input``) -> WebDataset tar shards in ``out`` (``PREFIX-000000.tar``
    ..., ``sizes.json`` written last, ``skipped.json``, ``classes.json`` when names are known).

    Keywords are the command's flags (see the module docstring): ``order`` "shuffled" (seeded)
    or "sorted"; ``classes`` a classes.json to number classes by (the training split's);
    ``overwrite`` replaces shards already in ``out``; an interrupted run resumes.  Bad input is an
    :class:`~mlcd_core.errors.MLCDError` naming the file or option.
    """
    if shard_size < 1:
        raise MLCDError(f"--shard-size must be >= 1, got {shard_size}")
    if max_bytes < 1:
        raise MLCDError(f"--max-bytes must be >= 1, got {max_bytes}")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", prefix):
        raise MLCDError(f"--prefix {prefix!r}: use letters, digits, '-' and '_' only")
    if format not in ("auto", "folder", "idx", "list") or order not in ("shuffled", "sorted"):
        raise MLCDError(f"format {format!r} / order {order!r}: use auto|folder|idx|list and shuffled|sorted")
    args = argparse.Namespace(input=input, out=out, format=format, shard_size=shard_size, max_bytes=max_bytes,
                              prefix=prefix, order=order, seed=seed, max_image_pixels=max_image_pixels,
                              overwrite=overwrite, classes=classes, list_root=list_root)
    summary = write_shards(args)
    return ShardsResult(summary["out"], summary["shards"], summary["samples"], summary["skipped"])


def main(argv: list[str] | None = None) -> int:
    """``mlcd shards``' command line: the flags of :func:`build_parser` -> :func:`make_shards`."""
    a = build_parser().parse_args(argv)
    summary = make_shards(a.input, a.out, format=a.format, shard_size=a.shard_size, max_bytes=a.max_bytes,
                          prefix=a.prefix, order=a.order, seed=a.seed, max_image_pixels=a.max_image_pixels,
                          overwrite=a.overwrite, classes=a.classes, list_root=a.list_root)
    print(f"mlcd shards: wrote {summary.samples} samples in {summary.shards} shards to {summary.out}")
    if summary.skipped:
        print(f"mlcd shards: skipped {len(summary.skipped)} inputs (listed in {summary.out}/skipped.json):")
        for s in summary.skipped:
            print(f"  {s['path']}: {s['reason']}")
    return 0


if __name__ == "__main__":
    from mlcd_core.stage import run_main
    from mlcd_train.data import shards as _stage  # the module under its own name, as `mlcd shards` runs it

    sys.exit(run_main("shards", _stage.main, sys.argv[1:]))
