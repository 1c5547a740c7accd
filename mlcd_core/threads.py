"""CPU thread counts for one call, restored afterwards.

``mlcd cluster`` and ``mlcd assign`` take ``threads`` (faiss's OpenMP and torch's intra-op
threads).  Set for good, a notebook or pipeline that clusters in process and then trains in
the same process keeps those threads: two such runs on two cores then run four threads and
train about three times slower (measured: 35 against 115 img/s).  A library function must not
change its caller's process-wide settings, so the count is put back when the call ends.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager

__all__ = ["num_threads", "restores_threads"]


def _faiss():
    try:
        import faiss
    except ImportError:  # faiss is a dependency, but torch-only callers need not import it
        return None
    return faiss


@contextmanager
def num_threads(threads: int):
    """torch's and faiss's CPU thread counts are ``threads`` inside the block (``0``: left as
    they are), and what they were before once it ends, normally or by an exception."""
    if not threads or threads < 1:
        yield
        return
    import torch

    faiss = _faiss()
    torch_before = torch.get_num_threads()
    faiss_before = faiss.omp_get_max_threads() if faiss is not None else None
    torch.set_num_threads(threads)
    if faiss is not None:
        faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(torch_before)
        if faiss is not None:
            faiss.omp_set_num_threads(faiss_before)


def restores_threads(fn):
    """Decorator: runs ``fn`` under :func:`num_threads` with its keyword argument ``threads``."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with num_threads(kwargs.get("threads", 0)):
            return fn(*args, **kwargs)
    return wrapper
