"""Atomic file writes.

Every file the pipeline writes goes through these helpers: the content is written to a
temporary file in the same folder, flushed and fsync'ed, then renamed over the target, so a
crash or a kill leaves either the old file or the new one, never half of one.  Temporary
names end with ``.tmp`` and carry the pid, so concurrent ranks never collide.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from mlcd_core.errors import MLCDError

TMP_SUFFIX = ".tmp"


def tmp_path_for(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[io.IOBase]:
    """Open a temporary file for writing; rename it to ``path`` when the block succeeds."""
    if "r" in mode or "a" in mode:
        raise ValueError(f"atomic_open is for writing, got mode {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_save_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def atomic_save_npy(path: str | os.PathLike, array) -> None:
    import numpy as np

    with atomic_open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


class OrderedWriter:
    """Runs write jobs in a background thread, in submission order, at most ``depth`` queued.

    File writes and fsync release the GIL, so they overlap the caller's compute.  An error
    in a job is raised by the next :meth:`submit` or by :meth:`close`; ``close(wait_only=True)``
    (for an exception path) lets queued jobs finish so nothing already computed is lost."""

    def __init__(self, depth: int = 1):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlcd-writer")
        self._pending: list = []
        self.depth = depth

    def submit(self, fn, *args) -> None:
        while len(self._pending) >= self.depth:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(fn, *args))

    def close(self, wait_only: bool = False) -> None:
        try:
            for fut in self._pending:
                if wait_only:
                    fut.exception()
                else:
                    fut.result()
        finally:
            self._pending = []
            self._pool.shutdown(wait=True)


#: no JSON file the pipeline writes comes near this (a sizes.json of a million shards: ~40 MB)
MAX_JSON_BYTES = 256 << 20

_JSON_TYPES = {dict: "an object {...}", list: "a list [...]", str: "a string", int: "an integer",
               float: "a number", bool: "true or false"}


def load_json(path: str | os.PathLike, expect: type | None = None) -> Any:
    """Read a JSON file (a regular file of at most MAX_JSON_BYTES); a missing, special, oversized
    or malformed file, or one whose top level is not ``expect`` (e.g. ``dict``), is an MLCDError
    naming it."""
    try:
        data = read_regular(path, MAX_JSON_BYTES, "JSON file")
    except FileNotFoundError:
        raise MLCDError(f"{path}: file not found") from None
    except OSError as exc:
        raise MLCDError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise MLCDError(f"{path}: not valid JSON (not UTF-8: {exc})") from None
    except (ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, or an integer of > 4300 digits
        raise MLCDError(f"{path}: not valid JSON ({str(exc)[:200]})") from None
    if expect is not None and not _is_type(obj, expect):
        raise MLCDError(f"{path}: expected {_JSON_TYPES.get(expect, expect.__name__)} at the top level, "
                        f"found {_json_kind(obj)}")
    return obj


def _is_type(value: Any, kind) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return False  # JSON true is not an integer
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, kinds)


def _json_kind(value: Any) -> str:
    for t in (bool, dict, list, str, int, float):
        if isinstance(value, t):
            return _JSON_TYPES[t]
    return "null" if value is None else type(value).__name__


def json_field(obj: dict, key: str, kind, path: str | os.PathLike, *, default: Any = ...,
               nullable: bool = False) -> Any:
    """``obj[key]`` checked to be of ``kind`` (a type or tuple; bool is never taken for int);
    a missing key (without ``default``) or a value of another type is an MLCDError naming
    ``path`` and the key."""
    if key not in obj:
        if default is not ...:
            return default
        raise MLCDError(f"{path}: key {key!r} is missing")
    value = obj[key]
    if value is None and nullable:
        return None
    if not _is_type(value, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        want = " or ".join(_JSON_TYPES.get(k, k.__name__) for k in kinds)
        raise MLCDError(f"{path}: key {key!r} should be {want}, found {_json_kind(value)} ({str(value)[:40]!r})")
    return value


#: no shard or embeddings file holds more samples than this (a tar needs 512 bytes a sample: 512 TiB)
MAX_COUNT = 1 << 40


def json_counts(obj: Any, path: str | os.PathLike, key: str | None = None) -> dict:
    """A {file name: non-negative integer} mapping (``sizes.json``, ``meta.json`` counts) checked
    entry by entry: every name a plain file name (:func:`check_name`), every count an int in
    0 .. MAX_COUNT (a count is used to size arrays and skip passes before any file is read)."""
    where = f"key {key!r}" if key else "top level"
    if not isinstance(obj, dict):
        raise MLCDError(f"{path}: {where} should be an object {{name: count}}, found {_json_kind(obj)}")
    for name, n in obj.items():
        check_name(name, path, "shard name")
        if not _is_type(n, int) or not 0 <= n <= MAX_COUNT:
            raise MLCDError(f"{path}: count of {name!r} ({where}) should be an integer in 0..{MAX_COUNT}, "
                            f"found {_json_kind(n)} ({str(n)[:40]!r})")
    return obj


# ------------------------------------------------------------------ hostile input
#
# Every file the pipeline reads may come from someone else: nothing read may run code, name
# a path outside its folder, block (a FIFO) or be endless (/dev/zero), and no stage may write
# into a folder it reads.  The helpers below are the one place each of those rules lives.

def check_name(name: Any, source: str | os.PathLike, what: str = "file name") -> str:
    """``name`` if it is a plain file name (a non-empty string without a folder separator, not
    '.' or '..', no NUL); else an MLCDError naming ``source`` (the file it was read from).
    Names read from meta files, tars or lists are joined to a folder: this keeps them in it."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or (os.sep in name) or (os.altsep is not None and os.altsep in name)):
        raise MLCDError(f"{source}: {what} {str(name)[:80]!r} is not a plain file name (no folder, '..' "
                        "or NUL allowed): a path taken from a file must stay in its folder")
    return name


def inside(child: str | os.PathLike, parent: str | os.PathLike) -> bool:
    """True when path ``child`` is ``parent`` or lies under it (both compared as given: pass
    resolved paths, or :func:`os.path.normpath` ones for a lexical check)."""
    child, parent = os.fspath(child), os.fspath(parent)
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


class UnsafeFile(MLCDError):
    """A file that is not read: not a regular file, or larger than allowed (``.reason`` says
    which, without the path, for a caller that reports the path itself)."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.reason = reason


def _unsafe(path, reason: str) -> UnsafeFile:
    return UnsafeFile(path, reason)


def check_regular(path: str | os.PathLike, max_bytes: int | None = None, what: str = "file") -> int:
    """Size of ``path`` after following links, if it is a regular file of at most ``max_bytes``;
    else an MLCDError (with ``.reason``) naming it.  FileNotFoundError passes through."""
    st = os.stat(path)
    return _check_stat(path, st, max_bytes, what)


def _check_stat(path, st, max_bytes, what) -> int:
    import stat

    if not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "a special file")
        raise _unsafe(path, f"not a regular {what} ({kind}); only regular files are read")
    if max_bytes is not None and st.st_size > max_bytes:
        raise _unsafe(path, f"{what} of {st.st_size} bytes, over the limit of {max_bytes}")
    return int(st.st_size)


def open_regular(path: str | os.PathLike, max_bytes: int | None = None, what: str = "file"):
    """Open ``path`` for binary reading only if it is a regular file of at most ``max_bytes``.

    The file is opened without blocking (a FIFO would otherwise wait forever for a writer)
    and checked with fstat on the open descriptor, so what is checked is what is read."""
    import fcntl

    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        _check_stat(path, os.fstat(fd), max_bytes, what)
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~getattr(os, "O_NONBLOCK", 0))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (checked before reading, and again
    while reading: a file that grows past the limit is not read further)."""
    with open_regular(path, max_bytes, what) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _unsafe(path, f"{what} grew past the limit of {max_bytes} bytes while being read")
    return data


def safe_torch_load(path: str | os.PathLike, what: str = "torch file", mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` on CPU of a regular file: tensors, dicts, lists, tuples,
    numbers and strings only, so a pickled object in the file cannot run code.  Unreadable,
    truncated or unsafe files are MLCDErrors naming the file."""
    import pickle
    import zipfile

    import torch

    try:
        if mmap:
            check_regular(path, what=what)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        with open_regular(path, what=what) as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MLCDError(f"{path}: {what} not found") from None
    except MLCDError:
        raise
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MLCDError(f"{path}: {what} holds more than tensors and plain values; refused, as loading it "
                        f"could run code (weights_only=True: {first[:200]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError,
            TypeError, AttributeError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MLCDError(f"{path}: not a readable {what} (truncated or not written by torch.save: "
                        f"{first[:200]})") from None


def safe_np_load(path: str | os.PathLike, what: str = "array", mmap_mode: str | None = None,
                 max_bytes: int | None = None):
    """``np.load(allow_pickle=False)`` of a regular ``.npy`` / ``.npz`` file (no object arrays,
    so nothing is unpickled); unreadable files are MLCDErrors naming the file."""
    import numpy as np

    try:
        check_regular(path, max_bytes, what)
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except FileNotFoundError:
        raise MLCDError(f"{path}: {what} file not found") from None
    except MLCDError:
        raise
    except (ValueError, OSError, EOFError) as exc:
        raise MLCDError(f"{path}: not a readable .npy/.npz {what} ({str(exc)[:200]})") from None


def check_out_separate(out_option: str, out: str | os.PathLike, inputs, *, out_is_file: bool = False,
                       replaces_out: bool = False, recursive: tuple = ()) -> None:
    """Refuse an output that shares a folder with an input: a stage never writes into (or
    clears) a folder it reads.  Paths are compared resolved (links followed).

    ``inputs``: (option, path) pairs, None paths ignored; an input folder is the path when it
    is a folder, else the folder holding it.  Refused: the output folder (``out``, or the
    folder holding it with ``out_is_file``) being an input folder; with ``replaces_out`` (the
    stage replaces ``out`` as a whole) an input lying anywhere under ``out``; for the options
    in ``recursive`` (read with their subfolders) ``out`` lying anywhere under the input."""
    o = os.path.realpath(os.path.expanduser(os.fspath(out)))
    o_folder = os.path.dirname(o) if out_is_file else o
    for option, p in inputs:
        if p is None:
            continue
        r = os.path.realpath(os.path.expanduser(os.fspath(p)))
        folder = r if os.path.isdir(r) else os.path.dirname(r)
        if o_folder == folder:
            raise MLCDError(f"{out_option} {out}: is the folder of {option} {p} ({folder}); a stage never writes "
                            f"into a folder it reads: pick another {out_option}")
        if replaces_out and inside(r, o):
            raise MLCDError(f"{out_option} {out}: holds {option} {p}, and writing {out_option} replaces it "
                            f"as a whole: pick another {out_option}")
        if option in recursive and inside(o_folder, folder):
            raise MLCDError(f"{out_option} {out}: lies inside {option} {p}, which is read with its "
                            f"subfolders: pick an {out_option} outside it")


def remove_stale_tmp(folder: str | os.PathLike) -> int:
    """Delete temporary files left by a killed writer in ``folder``; returns how many."""
    n = 0
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(f".*{TMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                n += 1
    return n
