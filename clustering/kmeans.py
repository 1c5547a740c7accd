"""``mlcd cluster``: spherical k-means over an embeddings folder.

    mlcd cluster --emb EMB --k K --out CL [--niter 20] [--seed 0] [--init random|kmeans++]
                 [--max-points-per-centroid 256] [--method auto|flat|two-level|distributed]
                 [--backend auto|faiss|torch] [--gpu]
    torchrun --nproc-per-node 8 -m clustering.kmeans --method distributed ...

Writes ``CL/centroids.npy`` (float32 [k, d], L2-normalised) and ``CL/meta.json`` (k, d,
n_total, n_train, method, backend, seed, init, iterations actually run, objective per
iteration, seconds, embedder).

Training sample.  With ``--max-points-per-centroid M`` (0 = all points) at most k*M points
are used: a seeded uniform sample drawn here, recorded in meta.json (n_train, subsampled);
faiss is told never to subsample on its own (its default silently keeps k*256 points).

Initial centres: ``--init random`` (k distinct training points) or ``kmeans++`` (faiss's
``ClusteringInitialization``), both seeded and computed here, so every backend and method
starts from the same centres.  greedy k-means++ (D^2 sampling, implemented here: faiss's own
``ClusteringInitialization`` k-means++ missed clusters of a well-separated mixture in our
tests) costs O(n k d); it runs on ``--init-sample`` points.

Methods:
  flat        one k-means (faiss, or torch Lloyd's with ``--backend torch``);
  two-level   about sqrt(k) coarse centres, then every coarse cluster split with k-means into
              a number of centres proportional to its size (sum = k);
  distributed Lloyd's under torch.distributed: each rank holds a slice of the training points,
              per-centre sums (float64) and counts are all-reduced; same centres as the
              single-process run from the same initial centres;
  auto        distributed when launched on several ranks, two-level when k > --two-level-above,
              flat otherwise.

Lloyd's (torch backend and distributed): assignment by maximum inner product (bf16 candidate
pick + exact fp32 re-rank on GPU), centres = normalised mean of their points; an empty
centre takes half of the currently largest cluster (its centre nudged apart, deterministic
for the seed), as faiss does.  The objective per iteration is the sum of each point's
similarity to its centre before the update (faiss's ``obj``).
Deterministic for a given seed and thread count (``--threads``).

Python: :func:`cluster` (an array in memory -> :class:`ClusterResult`) and
:func:`cluster_folder` (an EMB folder -> CL/, what the command runs).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from clustering import store
from clustering.search import TorchSearcher, faiss_has_gpu, pick_backend
from mlcd_core.errors import MLCDError
from mlcd_core.args import nonneg_int, positive_int, seed_int
from mlcd_core.io import atomic_save_json, atomic_save_npy, check_out_separate, load_json
from mlcd_core.lock import output_lock
from mlcd_core.threads import restores_threads

DEFAULT_TWO_LEVEL_ABOVE = 65536


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlcd cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--emb", required=True, help="embeddings folder written by mlcd embed")
    p.add_argument("--k", type=positive_int, required=True, help="number of centres")
    p.add_argument("--out", required=True, help="output folder (centroids.npy, meta.json)")
    p.add_argument("--niter", type=nonneg_int, default=20, help="Lloyd iterations (default 20)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the sample, the init and faiss (default 0)")
    p.add_argument("--init", choices=["random", "kmeans++"], default="random",
                   help="initial centres: k random training points, or k-means++ (default random)")
    p.add_argument("--init-sample", type=nonneg_int, default=0,
                   help="points k-means++ runs on (default: min(n_train, max(4k, 20000)))")
    p.add_argument("--max-points-per-centroid", type=nonneg_int, default=256,
                   help="train on at most k*M points, seeded uniform sample, recorded (0 = all; default 256)")
    p.add_argument("--method", choices=["auto", "flat", "two-level", "distributed"], default="auto")
    p.add_argument("--two-level-above", type=nonneg_int, default=DEFAULT_TWO_LEVEL_ABOVE,
                   help=f"--method auto picks two-level when k exceeds this (default {DEFAULT_TWO_LEVEL_ABOVE})")
    p.add_argument("--backend", choices=["auto", "faiss", "torch"], default="auto",
                   help="auto: faiss-gpu if importable and a GPU is used, else torch on CUDA, else faiss-cpu")
    p.add_argument("--gpu", action="store_true", help="use the GPU (faiss-gpu when importable, else torch)")
    p.add_argument("--threads", type=nonneg_int, default=0, help="CPU threads for faiss/torch (default: all)")
    p.add_argument("--embedder", default=None, help="fail unless EMB was made with this embedder spec")
    p.add_argument("--overwrite", action="store_true", help="redo when OUT already holds centres")
    return p


# ----------------------------------------------------------------------------------- pieces

def training_rows(n_total: int, k: int, mppc: int, seed: int) -> np.ndarray:
    """Sorted global row indices of the training sample (all rows when small enough)."""
    cap = n_total if mppc <= 0 else min(n_total, k * mppc)
    if cap >= n_total:
        return np.arange(n_total, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=cap, replace=False)).astype(np.int64)


def init_rows(n: int, k: int, init: str, seed: int, init_sample: int = 0) -> np.ndarray:
    """Sorted indices (into the n training points) that the initial centres are drawn from."""
    if init == "random":
        return np.sort(np.random.default_rng(seed + 1).choice(n, size=k, replace=False))
    m = max(k, min(n, init_sample or max(4 * k, 20000)))
    if m >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed + 2).choice(n, size=m, replace=False))


def kmeans_pp(xs: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Seeded greedy k-means++ over the rows ``xs``: D^2 sampling with 2 + log(k) candidates
    per step, keeping the one that lowers the potential most (the usual greedy variant)."""
    xs = np.ascontiguousarray(xs, dtype=np.float32)
    m = len(xs)
    trials = 2 + int(np.log(k))
    rng = np.random.default_rng(seed)
    sq = np.einsum("ij,ij->i", xs, xs).astype(np.float64)

    def dist2(idx):  # [len(idx), m]
        return np.maximum(sq[idx, None] + sq[None, :] - 2.0 * (xs[idx] @ xs.T), 0.0)

    chosen = [int(rng.integers(m))]
    d2 = dist2(np.asarray(chosen))[0]
    for _ in range(1, k):
        cum = np.cumsum(d2)
        if cum[-1] <= 0:  # fewer distinct points than k: take unused rows in order
            chosen += np.setdiff1d(np.arange(m), chosen)[: k - len(chosen)].tolist()
            break
        cand = np.minimum(np.searchsorted(cum, rng.random(trials) * cum[-1], side="right"), m - 1)
        new = np.minimum(d2[None, :], dist2(cand))
        best = int(np.argmin(new.sum(axis=1)))
        chosen.append(int(cand[best]))
        d2 = new[best]
    return xs[np.asarray(chosen)].copy()


def centroids_from_rows(xs: np.ndarray, k: int, init: str, seed: int) -> np.ndarray:
    """random: the k rows themselves; kmeans++: seeded k-means++ over the rows."""
    xs = np.ascontiguousarray(xs, dtype=np.float32)
    if init == "random":
        return xs
    return kmeans_pp(xs, k, seed)


def initial_centroids(x: np.ndarray, k: int, init: str, seed: int, init_sample: int = 0) -> np.ndarray:
    """k initial centres from the training points ``x`` (float32 [n, d]); seeded."""
    return centroids_from_rows(x[init_rows(len(x), k, init, seed, init_sample)], k, init, seed)


def faiss_kmeans(x: np.ndarray, init: np.ndarray, niter: int, seed: int, gpu: bool = False):
    """One faiss spherical k-means from ``init``; faiss never subsamples. -> (centroids, stats)."""
    import faiss

    k, d = init.shape
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=max(1, -(-len(x) // k)) + 1, min_points_per_centroid=1,
                      gpu=bool(gpu and faiss_has_gpu()))
    km.train(np.ascontiguousarray(x, dtype=np.float32), init_centroids=init)
    stats = [{"obj": float(s["obj"]), "time": float(s["time"]), "imbalance": float(s["imbalance_factor"]),
              "nsplit": int(s["nsplit"])} for s in km.iteration_stats]
    return store.normalise(km.centroids.astype(np.float32)), stats


def _split_empty(cent, counts, seed: int, it: int):
    """Give every empty centre half of the largest cluster (deterministic); returns #splits."""
    import torch

    empty = torch.nonzero(counts == 0).squeeze(1).tolist()
    if not empty:
        return 0
    g = torch.Generator().manual_seed(seed * 1000003 + it)
    eps = 1.0 / 1024
    for ci in empty:
        cj = int(torch.argmax(counts))
        sign = (torch.randint(0, 2, (cent.shape[1],), generator=g).to(cent) * 2 - 1)
        base = cent[cj].clone()
        cent[ci] = base * (1 + eps * sign)
        cent[cj] = base * (1 - eps * sign)
        half = counts[cj] // 2
        counts[ci] = half
        counts[cj] -= half
    return len(empty)


def _index_add(sums, ids, src) -> None:
    """sums.index_add_(0, ids, src), deterministic on CUDA too (where the default float64
    atomics sum in any order): torch's deterministic mode, for this call only."""
    import torch

    if sums.device.type != "cuda":
        sums.index_add_(0, ids, src)
        return
    prev, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        sums.index_add_(0, ids, src)
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=warn)


def torch_lloyd(x_local: np.ndarray, init: np.ndarray, niter: int, seed: int, device=None,
                chunk: int = 65536, group=None, progress_desc: str | None = None):
    """Spherical Lloyd's on this rank's points; sums/counts all-reduced when distributed.

    Returns (centroids float32 [k, d] normalised, stats per iteration).  With one process
    this is the single-process reference of the distributed run.
    """
    import torch
    import torch.distributed as dist

    from mlcd_core.progress import progress

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    k, d = init.shape
    x = torch.from_numpy(np.ascontiguousarray(x_local, dtype=np.float32)).to(device)
    cent = torch.from_numpy(store.normalise(np.asarray(init, dtype=np.float32))).to(device).double()
    stats = []
    t0 = time.perf_counter()
    bar = progress(range(niter), desc=progress_desc or "lloyd", unit="it")
    with torch.inference_mode():
        for it in bar:
            searcher = TorchSearcher(cent.float(), device=str(device))
            sums = torch.zeros(k, d, dtype=torch.float64, device=device)
            counts = torch.zeros(k, dtype=torch.float64, device=device)
            obj = torch.zeros(1, dtype=torch.float64, device=device)
            for s in range(0, x.shape[0], chunk):
                xc = x[s: s + chunk]
                sc, ids = searcher.search_torch(xc, 1)
                ids = ids[:, 0]
                _index_add(sums, ids, xc.double())
                counts += torch.bincount(ids, minlength=k).double()
                obj += sc[:, 0].double().sum()
            if distributed:
                for t in (sums, counts, obj):
                    dist.all_reduce(t, group=group)
            nz = counts > 0
            new = cent.clone()
            new[nz] = sums[nz] / counts[nz, None]
            cnt = counts.clone()
            nsplit = _split_empty(new, cnt, seed, it)
            new = new / new.norm(dim=1, keepdim=True).clamp_min(1e-12)
            imbalance = float(k * (counts ** 2).sum() / counts.sum() ** 2)
            cent = new
            stats.append({"obj": float(obj.item()), "time": time.perf_counter() - t0,
                          "imbalance": imbalance, "nsplit": nsplit})
    return cent.float().cpu().numpy(), stats


def allocate(sizes: np.ndarray, k: int) -> np.ndarray:
    """Split k centres over clusters proportionally to ``sizes`` (each nonempty >= 1, <= size)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    if total < k:
        raise ValueError("fewer points than centres")
    quota = k * sizes / total
    alloc = np.minimum(np.floor(quota).astype(np.int64), sizes)
    alloc[(sizes > 0) & (alloc == 0)] = 1
    while alloc.sum() < k:
        room = alloc < sizes
        frac = np.where(room, quota - alloc, -np.inf)
        alloc[int(np.argmax(frac))] += 1
    while alloc.sum() > k:
        over = np.where(alloc > 1, alloc - quota, -np.inf)
        alloc[int(np.argmax(over))] -= 1
    return alloc


def two_level(x: np.ndarray, k: int, niter: int, seed: int, init: str, init_sample: int, backend: str,
              gpu: bool):
    """sqrt(k) coarse centres, then each coarse cluster split in proportion to its size."""
    from mlcd_core.progress import progress

    n = len(x)
    k1 = max(1, min(k, int(round(math.sqrt(k)))))
    c_init = initial_centroids(x, k1, init, seed, init_sample)
    coarse, coarse_stats = flat(x, c_init, niter, seed, backend, gpu)
    from clustering.search import make_searcher

    lab = np.empty(n, dtype=np.int64)
    srch = make_searcher(coarse, backend=backend, gpu=gpu)
    for s in range(0, n, 65536):
        lab[s: s + 65536] = srch.search(x[s: s + 65536], 1)[1][:, 0]
    sizes = np.bincount(lab, minlength=k1)
    alloc = allocate(sizes, k)
    order = np.argsort(lab, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    parts, fine_obj, fine_iters = [], 0.0, []
    for i in progress(range(k1), desc="two-level: fine", unit="cluster"):
        ki = int(alloc[i])
        if ki == 0:
            continue
        xi = x[order[bounds[i]: bounds[i + 1]]]
        if ki == 1:
            parts.append(store.normalise(xi.mean(axis=0, keepdims=True)))
            fine_obj += float((xi @ parts[-1].T).sum())
            continue
        ci, st = flat(xi, initial_centroids(xi, ki, init, seed + 7 * i + 1, init_sample), niter,
                      seed + i + 1, backend, gpu)
        parts.append(ci)
        fine_obj += st[-1]["obj"] if st else 0.0
        fine_iters.append(len(st))
    cent = np.concatenate(parts).astype(np.float32)
    info = {"coarse_k": k1, "coarse_iterations": len(coarse_stats),
            "coarse_objective": [s["obj"] for s in coarse_stats],
            "coarse_sizes_min_max": [int(sizes.min()), int(sizes.max())],
            "fine_iterations_max": max(fine_iters) if fine_iters else 0,
            "fine_objective_sum_last_iteration": fine_obj}
    return cent, coarse_stats, info


def flat(x, init, niter, seed, backend, gpu):
    if backend == "torch":
        return torch_lloyd(x, init, niter, seed)
    return faiss_kmeans(x, init, niter, seed, gpu)


# -------------------------------------------------------------------------------- Python API

@dataclass
class ClusterResult:
    """What :func:`cluster` and :func:`cluster_folder` return.

    ``centroids`` float32 [k, d], L2-normalised; ``objective``, ``imbalance``, ``nsplit``: one
    entry per Lloyd iteration (faiss's ``obj``: the sum of each point's similarity to its centre
    before the update); ``info``: method-specific figures (two-level: coarse k, sizes, ...);
    ``meta``: the dict written to ``CL/meta.json`` (folder runs only); ``path``: the
    ``centroids.npy`` written (None over arrays, and on ranks other than 0)."""

    centroids: np.ndarray
    method: str
    backend: str
    n_train: int
    n_total: int
    iterations: int
    objective: list = field(default_factory=list)
    imbalance: list = field(default_factory=list)
    nsplit: list = field(default_factory=list)
    seconds: float = 0.0
    info: dict = field(default_factory=dict)
    meta: Optional[dict] = None
    path: Optional[str] = None


def _resolve_method(method: str, k: int, world_size: int, two_level_above: int) -> str:
    if method == "auto":
        method = "distributed" if world_size > 1 else ("two-level" if k > two_level_above else "flat")
    if world_size > 1 and method != "distributed":
        raise MLCDError(f"--method {method} runs in one process; use --method distributed under torchrun")
    return method


def _check(k: int, niter: int) -> None:
    if k < 1 or niter < 0:
        raise MLCDError(f"--k must be >= 1 and --niter >= 0 (got k={k}, niter={niter})")


def _fit(gather, n_total: int, k: int, *, niter: int, seed: int, init: str, init_sample: int,
         max_points_per_centroid: int, method: str, backend: str, gpu: bool, rank: int = 0,
         world_size: int = 1, device=None) -> ClusterResult:
    """The k-means itself over rows fetched by ``gather(sorted row indices) -> float32 array``."""
    t0 = time.perf_counter()
    rows = training_rows(n_total, k, max_points_per_centroid, seed)
    n_train = len(rows)
    extra = {}
    if method == "distributed":
        mine = np.array_split(rows, world_size)[rank]
        x_local = gather(mine)
        # the initial centres come from rows every rank reads alike: identical everywhere
        idx = init_rows(n_train, k, init, seed, init_sample)
        start = centroids_from_rows(gather(rows[idx]), k, init, seed)
        cent, stats = torch_lloyd(x_local, start, niter, seed, device=device)
        extra["world_size"] = world_size
    else:
        x = gather(rows)
        if method == "two-level":
            cent, stats, extra = two_level(x, k, niter, seed, init, init_sample, backend, gpu)
        else:
            start = initial_centroids(x, k, init, seed, init_sample)
            cent, stats = flat(x, start, niter, seed, backend, gpu)
    return ClusterResult(centroids=store.normalise(cent.astype(np.float32)), method=method, backend=backend,
                         n_train=n_train, n_total=n_total, iterations=len(stats),
                         objective=[s["obj"] for s in stats], imbalance=[s["imbalance"] for s in stats],
                         nsplit=[s["nsplit"] for s in stats], seconds=time.perf_counter() - t0, info=extra)


@restores_threads
def cluster(emb: np.ndarray, k: int, *, niter: int = 20, seed: int = 0, init: str = "random",
            init_sample: int = 0, max_points_per_centroid: int = 256, method: str = "auto",
            two_level_above: int = DEFAULT_TWO_LEVEL_ABOVE, backend: str = "auto", gpu: bool = False,
            threads: int = 0) -> ClusterResult:
    """Spherical k-means of the rows of ``emb`` (float [n, d]; normalised here) in this process.

    The same algorithm as ``mlcd cluster`` (see the module docstring) over an array instead
    of an EMB folder: at most ``k * max_points_per_centroid`` rows (0 = all) drawn with
    ``seed``; ``init`` "random" or "kmeans++"; ``method`` "auto" | "flat" | "two-level"
    (auto: two-level above ``two_level_above`` centres); ``backend`` "auto" | "faiss" | "torch".
    Returns a :class:`ClusterResult` (``.centroids`` float32 [k, d], L2-normalised).

        >>> import numpy as np, clustering.kmeans as km
        >>> km.cluster(np.random.default_rng(0).normal(size=(500, 16)), 8, niter=5).centroids.shape
        (8, 16)
    """
    _check(k, niter)
    x = np.asarray(emb)
    if x.ndim != 2 or not len(x):
        raise MLCDError(f"cluster: emb should be a non-empty [n, d] array, found shape {x.shape}")
    if k > len(x):
        raise MLCDError(f"cluster: k={k} is larger than the number of embeddings ({len(x)})")
    if method == "distributed":
        raise MLCDError("cluster: --method distributed needs an EMB folder under torchrun (cluster_folder)")
    method = _resolve_method(method, k, 1, two_level_above)
    x = store.normalise(np.ascontiguousarray(x, dtype=np.float32))
    return _fit(lambda rows: x[rows], len(x), k, niter=niter, seed=seed, init=init, init_sample=init_sample,
                max_points_per_centroid=max_points_per_centroid, method=method,
                backend=pick_backend(backend, gpu), gpu=gpu)


@restores_threads
def cluster_folder(emb: str, k: int, out: str, *, niter: int = 20, seed: int = 0, init: str = "random",
                   init_sample: int = 0, max_points_per_centroid: int = 256, method: str = "auto",
                   two_level_above: int = DEFAULT_TWO_LEVEL_ABOVE, backend: str = "auto", gpu: bool = False,
                   threads: int = 0, embedder: Optional[str] = None,
                   overwrite: bool = False) -> Optional[ClusterResult]:
    """``mlcd cluster``: k-means of an EMB folder into ``out`` (``centroids.npy``, ``meta.json``).

    Options as :func:`cluster` (the command's flags by the same names); ``embedder``: refuse
    an EMB made by another embedder spec; ``overwrite``: redo when ``out`` holds centres.
    Under torchrun (several ranks) ``method`` "auto" or "distributed" runs Lloyd's over all
    ranks.  Returns the :class:`ClusterResult` (``meta`` is what meta.json holds), or None when
    ``out`` already holds the centres of this very run (nothing done).  Bad input is an
    :class:`~mlcd_core.errors.MLCDError` naming the file or option.
    """
    from mlcd_core.dist import barrier, init_distributed

    _check(k, niter)
    # CL/meta.json is replaced: never EMB's own meta.json
    check_out_separate("--out", out, [("--emb", emb)])
    with output_lock(out, "cluster"):  # one run at a time into this output (issue 15)
        info = init_distributed(device="cuda" if gpu else None)
        out_c = os.path.join(out, "centroids.npy")
        out_m = os.path.join(out, "meta.json")
        folder = store.open_emb(emb, expect_embedder=embedder)
        if os.path.exists(out_c) and os.path.exists(out_m) and not overwrite:
            # finished before: nothing to do if it was this run, a clear error if another
            old = load_json(out_m, expect=dict)
            asked = {"k": k, "emb": store.resolve(emb), "embedder": folder.embedder, "seed": seed,
                     "init": init, "niter": niter, "max_points_per_centroid": max_points_per_centroid,
                     "embedder_info": folder.meta.get("embedder_info")}
            if method != "auto":
                asked["method"] = method
            differ = store.run_difference(old, asked, only_recorded=True)
            if differ:
                raise MLCDError(f"{out_m}: {out} holds centres of another run ({differ}); "
                                f"use --overwrite or another --out")
            if info.is_main:
                print(f"mlcd cluster: {out_c} exists; nothing to do (use --overwrite to redo)", file=sys.stderr)
            return None
        barrier()  # every rank has looked for finished centres before rank 0 may write them (see embed)
        n_total = folder.total
        if k > n_total:
            raise MLCDError(f"{os.path.join(emb, store.META)}: k={k} is larger than the number of "
                            f"embeddings ({n_total})")
        method = _resolve_method(method, k, info.world_size, two_level_above)
        backend = "torch" if method == "distributed" else pick_backend(backend, gpu)
        res = _fit(lambda rows: store.gather(folder, rows), n_total, k, niter=niter, seed=seed, init=init,
                   init_sample=init_sample, max_points_per_centroid=max_points_per_centroid, method=method,
                   backend=backend, gpu=gpu, rank=info.rank, world_size=info.world_size, device=info.device)
        if info.is_main:
            res.meta = {"k": k, "d": folder.dim, "n_total": n_total, "n_train": res.n_train,
                        "subsampled": res.n_train < n_total, "max_points_per_centroid": max_points_per_centroid,
                        "method": method, "backend": backend, "seed": seed, "init": init,
                        "niter": niter, "iterations": res.iterations, "objective": res.objective,
                        "imbalance": res.imbalance, "nsplit": res.nsplit,
                        "seconds": res.seconds, "threads": threads or None, "embedder": folder.embedder,
                        "embedder_info": folder.meta.get("embedder_info"), "emb": store.resolve(emb), **res.info}
            # meta.json goes first and comes back last: killed between the two writes, the folder
            # has no meta.json, so a rerun redoes it instead of pairing new centres with old meta
            with contextlib.suppress(FileNotFoundError):
                os.unlink(out_m)
            atomic_save_npy(out_c, res.centroids)
            atomic_save_json(out_m, res.meta)
            res.path = out_c
            print(f"mlcd cluster: {k} centres from {res.n_train}/{n_total} points, {method}/{backend}, "
                  f"{res.iterations} iterations, {res.seconds:.1f}s -> {out_c}", file=sys.stderr)
        barrier()
        return res


# ------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    """``mlcd cluster``'s command line: the flags of :func:`build_parser` -> :func:`cluster_folder`."""
    a = build_parser().parse_args(argv)
    cluster_folder(a.emb, a.k, a.out, niter=a.niter, seed=a.seed, init=a.init, init_sample=a.init_sample,
                   max_points_per_centroid=a.max_points_per_centroid, method=a.method,
                   two_level_above=a.two_level_above, backend=a.backend, gpu=a.gpu, threads=a.threads,
                   embedder=a.embedder, overwrite=a.overwrite)
    return 0


if __name__ == "__main__":
    from clustering import kmeans as _stage  # the module under its own name, as `mlcd cluster` runs it
    from mlcd_core.stage import run_main

    sys.exit(run_main("cluster", _stage.main, sys.argv[1:]))
