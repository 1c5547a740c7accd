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


def load_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing or malformed file is an MLCDError naming it."""
    from mlcd_train.utils.errors import MLCDError

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise MLCDError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise MLCDError(f"{path}: not valid JSON ({exc})") from None


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
