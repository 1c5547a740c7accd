"""``mlcd assign``: give every embedding its top-L most similar centres (multi-label classes).

    mlcd assign --emb EMB --centroids CL/centroids.npy --topk 8 --out LBL
                [--threshold T] [--approx --nprobe 16 | --approx --target-recall 0.95]
                [--backend auto|faiss|torch]
    torchrun --nproc-per-node 8 -m clustering.assign ...    (shards split over ranks)

Per EMB shard: ``LBL/<shard>.labels.npy`` int32 [n, L] (most similar first),
``LBL/<shard>.scores.npy`` float16 [n, L] (inner products), ``LBL/<shard>.keys.npy`` (EMB's
keys, hard-linked or copied, row-aligned; written last, it marks the shard finished).
``--threshold T`` keeps only centres with similarity > T, padding with label -1 and score
-inf; the top-1 is always kept (the paper's adaptive variant).

Also ``LBL/meta.json`` (k, topk, centroids, embedder, threshold, search, per-shard counts),
``LBL/stats.json`` (cluster sizes by top-1 and top-L, empty clusters, imbalance
k*sum(n_i^2)/N^2, mean similarity, purity against the shards' ground-truth classes when EMB
has ``<shard>.cls.npy``) and ``LBL/cluster_sizes.png``.

Streaming: shards are read in ``--chunk`` rows by one read-ahead thread, searched, and
written by a background writer while the next shard is searched, so memory does not grow
with the corpus; the statistics are summed on the way, and NaN / zero-norm rows are found
from the search scores (:func:`check_by_scores`).
Exact search by default (faiss ``IndexFlatIP``); ``--approx`` searches the centres through
an IVF index (``--nlist``, ``--nprobe``) and reports recall@L against exact search on
``--recall-sample`` rows; ``--target-recall R`` instead picks the smallest nprobe (doubling
from 1) whose recall@L on that sample reaches R, and records the curve in meta.json.
``--backend torch``: bf16 candidate pick on GPU + exact fp32 re-rank, equal to exact search
(see clustering/search.py).  A rerun skips finished shards; ``--overwrite`` redoes them.

Refused before anything is written: centres and embeddings of different dimension, L > k,
missing/truncated files, an EMB made by another embedder than the centres (or than
``--embedder``); NaN or zero-norm embeddings stop the run naming shard and row, leaving
finished shards intact.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from clustering import store
from clustering.search import make_searcher, pick_backend
from mlcd_core.errors import MLCDError
from mlcd_core.args import float_between, fraction_left_open, nonneg_int, positive_int
from mlcd_core.io import (OrderedWriter, atomic_save_json, atomic_save_npy, check_out_separate, json_field,
                                 load_json, remove_stale_tmp, safe_np_load)
from mlcd_core.lock import output_lock
from mlcd_core.threads import restores_threads


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlcd assign", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--emb", required=True, help="embeddings folder written by mlcd embed")
    p.add_argument("--centroids", required=True, help="centres, float32 [k, d] (CL/centroids.npy)")
    p.add_argument("--topk", type=positive_int, default=8, help="labels per image, L (paper: 8)")
    p.add_argument("--out", required=True, help="labels folder")
    p.add_argument("--threshold", type=float_between(-1.0, 1.0), default=None,
                   help="keep only centres with similarity > T, judged on the score as stored (float16) "
                        "(pad -1); the top-1 is always kept")
    p.add_argument("--approx", action="store_true", help="IVF search over the centres (very large k)")
    p.add_argument("--nlist", type=nonneg_int, default=0, help="IVF lists (default min(k/39, 4 sqrt(k)))")
    p.add_argument("--nprobe", type=positive_int, default=16, help="IVF lists visited per query (default 16)")
    p.add_argument("--recall-sample", type=positive_int, default=10000,
                   help="rows on which --approx is compared with exact search (default 10000)")
    p.add_argument("--target-recall", type=fraction_left_open, default=None,
                   help="with --approx: pick the smallest nprobe (1, 2, 4, ... nlist) whose recall@L "
                        "on the recall sample reaches this (e.g. 0.95); overrides --nprobe")
    p.add_argument("--backend", choices=["auto", "faiss", "torch"], default="auto")
    p.add_argument("--cand-dtype", choices=["bfloat16", "float16", "tf32", "float32"], default=None,
                   help="torch backend candidate matmul precision (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--gpu", action="store_true", help="use the GPU (faiss-gpu when importable, else torch)")
    p.add_argument("--chunk", type=int,  # range checked in main (0 = default): "--chunk must be positive" default=0,
                   help="rows searched at once (default: 4096 on CPU, where a chunk that stays in "
                        "cache between conversion and search measured ~8%% less CPU per row than "
                        "16384; 65536 on GPU)")
    p.add_argument("--threads", type=nonneg_int, default=0, help="CPU threads (default: all)")
    p.add_argument("--embedder", default=None, help="fail unless EMB was made with this embedder spec")
    p.add_argument("--overwrite", action="store_true", help="redo finished shards")
    p.add_argument("--no-stats", action="store_true", help="skip stats.json and cluster_sizes.png")
    return p


def load_centroids(path: str) -> tuple[np.ndarray, dict]:
    """Centres float32 [k, d] normalised, plus the meta.json beside them (or {})."""
    info = store.npy_info(path, "centroids")
    if len(info.shape) != 2 or info.dtype.kind != "f":
        raise MLCDError(f"{path}: centroids must be a float [k, d] array, got {info.shape} {info.dtype}")
    c = safe_np_load(path, "centroids").astype(np.float32)
    if not np.isfinite(c).all():
        raise MLCDError(f"{path}: centroids hold NaN/inf")
    if (np.linalg.norm(c, axis=1) < 1e-12).any():
        raise MLCDError(f"{path}: centroid {int(np.flatnonzero(np.linalg.norm(c, axis=1) < 1e-12)[0])} has zero norm")
    meta_path = os.path.join(os.path.dirname(os.path.abspath(path)), "meta.json")
    meta = load_json(meta_path, expect=dict) if os.path.exists(meta_path) else {}
    json_field(meta, "embedder", str, meta_path, default=None, nullable=True)
    json_field(meta, "embedder_info", dict, meta_path, default=None, nullable=True)
    return store.normalise(c), meta


def apply_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float | None):
    if threshold is None:
        return labels, scores
    # judged on the score as stored (float16), so that every kept label's stored score is > T
    drop = scores.astype(np.float16).astype(np.float32) <= threshold
    drop[:, 0] = False
    labels = np.where(drop, -1, labels)
    scores = np.where(drop, -np.inf, scores)
    return labels, scores


def label_done(out: str, name: str, n: int, L: int) -> bool:
    try:
        li = store.npy_info(os.path.join(out, f"{name}.labels.npy"))
        si = store.npy_info(os.path.join(out, f"{name}.scores.npy"))
        ki = store.npy_info(os.path.join(out, f"{name}.keys.npy"))
    except MLCDError:
        return False
    return li.shape == (n, L) and si.shape == (n, L) and ki.shape == (n,)


def assign_shard(searcher, shard: store.EmbShard, L: int, chunk: int, threshold, bar=None, *, chunks):
    """(labels int32 [n, L], scores float16 [n, L]) of one shard from its (start, raw) ``chunks``
    (of at most ``chunk`` rows, from the run-wide reader: see :func:`store.iter_raw_run`)."""
    labels = np.empty((shard.n, L), dtype=np.int32)
    scores = np.empty((shard.n, L), dtype=np.float16)
    # the reader thread only reads (float16): at most two raw chunks and one float32 chunk
    # are alive, so memory is bounded by --chunk, not n
    buf = np.empty((min(chunk, shard.n), shard.d), dtype=np.float32)  # reused for every chunk
    for start, raw in chunks:
        x = store.to_f32(raw, out=buf)
        del raw
        D, I = searcher.search(x, L)
        check_by_scores(x, D, I, shard, start)
        if getattr(searcher, "approx", False):
            D = np.where(I < 0, -np.inf, D)  # IVF: fewer than L centres in the probed lists
        lab, sc = apply_threshold(I, D, threshold)
        labels[start: start + len(x)] = lab  # cast to int32 / float16 on assignment
        scores[start: start + len(x)] = sc
        if bar is not None:
            bar.update(len(x))
    return labels, scores


def check_by_scores(x: np.ndarray, D: np.ndarray, I: np.ndarray, shard: store.EmbShard, start: int) -> None:
    """The NaN/inf and zero-norm check of a searched chunk, from its scores: only suspect rows
    are looked at value by value (store.check_rows, same error), not every row.

    Every bad row is a suspect.  A NaN or inf value makes every inner product of its row NaN
    or +-inf (IEEE arithmetic; the BLAS, faiss and torch kernels do not skip zero factors), so
    its best score is not finite or, where faiss found no finite score to keep, its top id is
    -1.  A row of norm below 1e-6 (the check's squared norm 1e-12) has every |score| <= its
    norm against unit centres.  Saves a pass over the chunk: 1.3 % of the loop at 500k x 256."""
    best = D[:, 0]
    suspect = ~np.isfinite(best) | (np.abs(best) <= 2e-6) | (I[:, 0] < 0)
    if suspect.any():
        rows = np.flatnonzero(suspect)
        store.check_rows(x[rows], shard, start, rows=rows)


def _shard_chunks(reader, shard: store.EmbShard, chunk: int):
    """This shard's (start, raw) items from the run-wide reader (:func:`store.iter_raw_run`)."""
    for _ in range(-(-shard.n // chunk)):
        sh, start, raw = next(reader)
        assert sh is shard, (sh.name, shard.name)
        yield start, raw


def write_shard_labels(out: str, sh: store.EmbShard, labels: np.ndarray, scores: np.ndarray) -> None:
    """labels, scores, then keys (last: its presence marks the shard finished; removed first, so
    a shard redone under --overwrite is unfinished while its files are being replaced)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(out, f"{sh.name}.keys.npy"))
    atomic_save_npy(os.path.join(out, f"{sh.name}.labels.npy"), labels)
    atomic_save_npy(os.path.join(out, f"{sh.name}.scores.npy"), scores)
    store.copy_keys(sh, os.path.join(out, f"{sh.name}.keys.npy"))


def recall_sample(emb: store.EmbFolder, centroids: np.ndarray, L: int, sample: int, seed: int = 0):
    """(x float32 [m, d], exact top-L ids [m, L]) on a seeded sample of the corpus."""
    from clustering.search import FaissSearcher

    m = min(sample, emb.total)
    rows = np.sort(np.random.default_rng(seed).choice(emb.total, size=m, replace=False))
    x = store.gather(emb, rows)
    _, Ie = FaissSearcher(centroids).search(x, L)
    return x, Ie


def recall_of(approx_searcher, x: np.ndarray, Ie: np.ndarray, L: int) -> dict:
    """recall@L and top-1 agreement of the approximate search against the exact ids ``Ie``."""
    _, Ia = approx_searcher.search(x, L)
    hit = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(Ia, Ie))
    return {"recall_at_L": hit / (len(x) * L), "top1_agreement": float((Ia[:, 0] == Ie[:, 0]).mean()),
            "sample": len(x)}


def recall_at_l(emb: store.EmbFolder, centroids: np.ndarray, approx_searcher, L: int, sample: int,
                seed: int = 0) -> dict:
    """recall@L of the approximate search against exact faiss search on a seeded sample."""
    x, Ie = recall_sample(emb, centroids, L, sample, seed)
    return recall_of(approx_searcher, x, Ie, L)


def tune_nprobe(approx_searcher, x: np.ndarray, Ie: np.ndarray, L: int, target: float) -> tuple[int, list]:
    """The smallest nprobe of 1, 2, 4, ..., nlist whose recall@L on the sample reaches ``target``
    (nprobe = nlist visits every centre, so the search ends); sets it on the searcher and
    returns it with the curve [{nprobe, recall_at_L, top1_agreement}, ...]."""
    curve = []
    p = 1
    while True:
        p = min(p, approx_searcher.nlist)
        approx_searcher.set_nprobe(p)
        r = recall_of(approx_searcher, x, Ie, L)
        curve.append({"nprobe": p, "recall_at_L": r["recall_at_L"], "top1_agreement": r["top1_agreement"]})
        if r["recall_at_L"] >= target or p == approx_searcher.nlist:
            return p, curve
        p *= 2


# ----------------------------------------------------------------------------------- stats

class LabelStats:
    """Running cluster statistics of labelled shards: cluster sizes by top-1 and top-L,
    similarities, and (label, class) pair counts for purity when classes are known."""

    def __init__(self, k: int, L: int):
        self.k, self.L = k, L
        self.top1 = np.zeros(k, dtype=np.int64)
        self.topl = np.zeros(k, dtype=np.int64)
        self.n = self.nl = self.n_cls = 0
        self.s1 = self.sl = 0.0
        self.max_cls = -1
        self.pair_codes: list = []
        self.pair_counts: list = []

    def add(self, lab: np.ndarray, sc: np.ndarray, cls: np.ndarray | None) -> None:
        self.n += len(lab)
        self.top1 += np.bincount(lab[:, 0], minlength=self.k)
        valid = lab >= 0
        if valid.all():  # no --threshold padding: skip the masked copies
            self.topl += np.bincount(lab.ravel(), minlength=self.k)
            self.sl += float(sc.sum(dtype=np.float64))
            self.nl += lab.size
        else:
            self.topl += np.bincount(lab[valid], minlength=self.k)
            self.sl += float(sc[valid].sum(dtype=np.float64))
            self.nl += int(valid.sum())
        self.s1 += float(sc[:, 0].sum(dtype=np.float64))
        if cls is not None:
            known = cls >= 0
            if known.any():
                self.max_cls = max(self.max_cls, int(cls[known].max()))
                codes = lab[known, 0].astype(np.int64) * (1 << 31) + cls[known]
                u, c = np.unique(codes, return_counts=True)
                self.pair_codes.append(u)
                self.pair_counts.append(c)
                self.n_cls += int(known.sum())

    def result(self) -> dict:
        n, nl = self.n, self.nl
        stats = {
            "n": n, "k": self.k, "topk": self.L,
            "top1": _size_stats(self.top1, n),
            "topL": _size_stats(self.topl, int(self.topl.sum())),
            "labels_per_image_mean": nl / max(n, 1),
            "mean_similarity_top1": self.s1 / max(n, 1),
            "mean_similarity_topL": self.sl / max(nl, 1),
        }
        if self.n_cls:
            codes = np.concatenate(self.pair_codes)
            counts = np.concatenate(self.pair_counts)
            u, inv = np.unique(codes, return_inverse=True)
            tot = np.bincount(inv, weights=counts)
            clus = u >> 31
            # purity: every cluster votes for its majority class
            order = np.lexsort((-tot, clus))
            first = np.ones(len(order), dtype=bool)
            first[1:] = clus[order][1:] != clus[order][:-1]
            stats["purity_top1"] = float(tot[order][first].sum() / self.n_cls)
            stats["labelled_images"] = self.n_cls
            stats["classes"] = self.max_cls + 1
        return stats


def compute_stats(out: str, emb: store.EmbFolder, k: int, L: int, acc: LabelStats | None = None,
                  done: set | None = None) -> tuple[dict, np.ndarray]:
    """(stats, top-1 cluster sizes [k]) over every shard of ``emb``: those named in ``done``
    are already in ``acc`` (added while they were labelled), the others are read from ``out``."""
    acc = acc or LabelStats(k, L)
    done = done or set()
    for sh in emb.shards:
        if sh.name not in done:
            acc.add(safe_np_load(os.path.join(out, f"{sh.name}.labels.npy"), "labels"),
                    safe_np_load(os.path.join(out, f"{sh.name}.scores.npy"), "scores"), store.load_cls(sh))
    return acc.result(), acc.top1


def _size_stats(sizes: np.ndarray, total: int) -> dict:
    k = len(sizes)
    return {"empty": int((sizes == 0).sum()), "min": int(sizes.min()), "max": int(sizes.max()),
            "mean": float(total / k), "median": float(np.median(sizes)),
            "imbalance": float(k * (sizes.astype(np.float64) ** 2).sum() / max(total, 1) ** 2),
            "sizes_sorted_desc_first_10": np.sort(sizes)[::-1][:10].astype(int).tolist()}


def plot_sizes(out: str, top1: np.ndarray) -> str:
    """cluster_sizes.png from the top-1 cluster sizes (second result of :func:`compute_stats`)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    from mlcd_core.io import atomic_open

    k = len(top1)
    fig = Figure(figsize=(10, 4))  # no pyplot: no global figure manager to keep in step
    ax = fig.subplots(1, 2)
    counts, edges = np.histogram(top1, bins=min(100, max(10, k // 4)))
    ax[0].stairs(counts, edges, fill=True)  # one artist, not one patch per bin
    ax[0].set_xlabel("images per cluster (top-1)")
    ax[0].set_ylabel("clusters")
    ax[0].set_yscale("log")
    # plain "1, 10, 100" labels and no minor ticks: the default log-axis labels go through
    # mathtext, which (with the minor ticks) was half of the plot's ~0.13 s at the end of a run
    ax[0].yaxis.set_major_locator(LogLocator(base=10))
    ax[0].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax[0].yaxis.set_minor_locator(NullLocator())
    ax[1].plot(np.sort(top1)[::-1])
    ax[1].set_xlabel("cluster rank")
    ax[1].set_ylabel("images (top-1)")
    fig.suptitle(f"cluster sizes, k={k}, {int(top1.sum())} images, {int((top1 == 0).sum())} empty")
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.88, wspace=0.3)
    path = os.path.join(out, "cluster_sizes.png")
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return path


# -------------------------------------------------------------------------------- Python API

@dataclass
class AssignResult:
    """What :func:`assign` returns: ``out`` the labels folder, ``k`` centres, ``topk`` labels per
    row, ``total`` rows, ``shards_done`` shards (re)written by this run on this rank,
    ``seconds``; on rank 0 ``meta`` (LBL/meta.json) and ``stats`` (stats.json, unless
    ``no_stats``)."""

    out: str
    k: int
    topk: int
    total: int
    shards_done: int
    seconds: float
    meta: Optional[dict] = None
    stats: Optional[dict] = None


@restores_threads
def assign(emb: str, centroids: str, out: str, *, topk: int = 8, threshold: Optional[float] = None,
           approx: bool = False, nlist: int = 0, nprobe: int = 16, recall_rows: int = 10000,
           target_recall: Optional[float] = None, backend: str = "auto", cand_dtype: Optional[str] = None,
           gpu: bool = False, chunk: int = 0, threads: int = 0, embedder: Optional[str] = None,
           overwrite: bool = False, no_stats: bool = False) -> AssignResult:
    """``mlcd assign``: every row of the EMB folder ``emb`` gets its ``topk`` most similar centres
    of ``centroids`` (``CL/centroids.npy``), written to the labels folder ``out``.

    Keywords are the command's flags (``recall_rows`` is ``--recall-sample``; see the module
    docstring): ``threshold`` keeps only centres with similarity > T (the top-1 always);
    ``approx`` searches an IVF index (``nlist``, ``nprobe`` or ``target_recall``); ``backend``
    "auto" | "faiss" | "torch"; ``chunk`` rows searched at once (0: 4096 on CPU, 65536 on GPU).
    Finished shards of the same run are kept unless ``overwrite``.  Runs on every rank under
    torchrun (shards split over ranks).  Bad input is an :class:`~mlcd_core.errors.MLCDError`
    naming the file or option, raised before anything is written.
    """
    from mlcd_core.dist import barrier, init_distributed
    from mlcd_core.progress import progress

    # LBL/meta.json, keys files and temporaries are replaced or deleted: never in EMB or CL
    check_out_separate("--out", out, [("--emb", emb), ("--centroids", centroids)])
    with output_lock(out, "assign"):  # one run at a time into this output (issue 15)
        info = init_distributed(device="cuda" if gpu else None)
        folder = store.open_emb(emb, expect_embedder=embedder)
        cent, cmeta = load_centroids(centroids)
        k, d = cent.shape
        L = topk
        if d != folder.dim:
            raise MLCDError(f"{centroids}: centres have dimension {d}, embeddings in "
                            f"{os.path.join(emb, store.META)} have {folder.dim}")
        if not 1 <= L <= k:
            raise MLCDError(f"{centroids}: --topk {L} must be between 1 and k={k}")
        if cmeta.get("embedder") not in (None, "", folder.embedder):
            raise MLCDError(f"{os.path.join(emb, store.META)}: embeddings made with {folder.embedder!r}, "
                            f"but the centres {centroids} come from {cmeta['embedder']!r}")
        c_sha = (cmeta.get("embedder_info") or {}).get("weights_sha")
        e_sha = (folder.meta.get("embedder_info") or {}).get("weights_sha")
        if c_sha and e_sha and c_sha != e_sha:
            raise MLCDError(f"{os.path.join(emb, store.META)}: embeddings made with other weights "
                            f"(weights_sha {e_sha}) than the embeddings the centres {centroids} were "
                            f"clustered from ({c_sha}), under the same spec {folder.embedder!r}")
        meta_path = os.path.join(out, "meta.json")
        # what makes two runs the same: a rerun may keep the other's finished shards only if all of
        # these agree (the centres by content, not just by path: a re-clustered CL/ keeps its path)
        settings = {
            "k": k, "topk": L, "centroids": store.resolve(centroids),
            "centroids_sha": store.array_fingerprint(cent), "emb": store.resolve(emb),
            "emb_shards": folder.meta.get("shards"), "embedder": folder.embedder,
            "embedder_info": folder.meta.get("embedder_info"),
            "threshold": threshold}
        old = load_json(meta_path, expect=dict) if os.path.exists(meta_path) else None
        differ = store.run_difference(old, settings) if old is not None else ""
        same_run = old is not None and not differ
        if old is not None and not same_run and not overwrite:
            raise MLCDError(f"{meta_path}: {out} holds labels of another run ({differ}); "
                            f"use --overwrite or another --out")
        barrier()  # every rank has read the old meta.json before rank 0 replaces it

        if target_recall is not None and not (approx and 0 < target_recall <= 1):
            raise MLCDError("--target-recall needs --approx and a value in (0, 1]")
        backend = pick_backend(backend, gpu)
        searcher = make_searcher(cent, backend=backend, approx=approx, nlist=nlist or None,
                                 nprobe=nprobe, gpu=gpu, cand_dtype=cand_dtype)
        chunk_rows = chunk or (65536 if getattr(searcher, "on_gpu", False) else 4096)
        if chunk_rows < 1:
            raise MLCDError(f"--chunk must be positive, not {chunk}")
        curve = None
        if target_recall is not None:
            # every rank tunes on the same seeded sample, so all of them pick the same nprobe
            xs, Ie = recall_sample(folder, cent, L, recall_rows)
            nprobe, curve = tune_nprobe(searcher, xs, Ie, L, target_recall)
            del xs, Ie
            if info.is_main and nprobe * 4 > searcher.nlist:
                # IVF then scans over a quarter of the centres plus its lists' overhead: measured
                # slower than exact search at k = 100k (bench_assign, random centres)
                print(f"mlcd assign: recall {target_recall} needs nprobe {nprobe} of nlist "
                      f"{searcher.nlist}: expect no speed-up over exact search (drop --approx); "
                      f"the centres have little cluster structure", file=sys.stderr)
        base_meta = {**settings, "dim": d, "total": folder.total, "counts": {sh.name: sh.n for sh in folder.shards}}
        if info.is_main:
            remove_stale_tmp(out)  # left by a killed run; no rank writes before the barrier
        if info.is_main and not same_run:
            # written first (complete=false), so a rerun with other settings is refused, not mixed in
            atomic_save_json(meta_path, {**base_meta, "complete": False})
        barrier()
        mine = store.shard_names_for_rank(folder.shards, info.rank, info.world_size)
        todo = [sh for sh in mine if overwrite or not label_done(out, sh.name, sh.n, L)]
        os.makedirs(out, exist_ok=True)
        if old is not None and not same_run:
            # --overwrite of another run's labels (other centres, embeddings or settings): none of
            # its shards may count as finished if this run is killed before redoing it.  Under the
            # same settings an old shard holds exactly what a redo writes, so it stays.
            for sh in todo:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(out, f"{sh.name}.keys.npy"))
        t0 = time.perf_counter()
        c0 = time.process_time()
        bar = progress(total=sum(sh.n for sh in todo), desc="assign", unit="folder")
        # a shard's files are written in the background while the next shard is searched
        writer = OrderedWriter(depth=1)
        acc = LabelStats(k, L) if info.is_main and not no_stats else None
        in_acc: set = set()
        reader = store.prefetch(store.iter_raw_run(todo, chunk_rows))  # one read-ahead thread per run
        try:
            for sh in todo:
                labels, scores = assign_shard(searcher, sh, L, chunk_rows, threshold, bar,
                                              chunks=_shard_chunks(reader, sh, chunk_rows))
                writer.submit(write_shard_labels, out, sh, labels, scores)
                if acc is not None:  # stats from memory: the end of the run reads back only other shards
                    acc.add(labels, scores, store.load_cls(sh))
                    in_acc.add(sh.name)
        except BaseException:
            writer.close(wait_only=True)  # finished shards still land on disk
            raise
        finally:
            reader.close()  # stops the read-ahead thread
        writer.close()
        bar.close()
        seconds = time.perf_counter() - t0
        cpu_seconds = time.process_time() - c0
        barrier()
        result = AssignResult(out=out, k=k, topk=L, total=folder.total, shards_done=len(todo), seconds=seconds)
        if info.is_main:
            search = {"backend": backend, "approx": approx}
            if approx:
                search.update(nlist=searcher.nlist, nprobe=searcher.nprobe)
                if curve is not None:
                    search.update(target_recall=target_recall, nprobe_curve=curve,
                                  recall={"recall_at_L": curve[-1]["recall_at_L"],
                                          "top1_agreement": curve[-1]["top1_agreement"],
                                          "sample": min(recall_rows, folder.total)})
                else:
                    search["recall"] = recall_at_l(folder, cent, searcher, L, recall_rows)
            if backend == "torch":
                search["cand_dtype"] = searcher.cand_dtype
                search["exact_fallback_rows"] = searcher.n_fallback
            meta = {**base_meta, "complete": True, "search": search,
                    "seconds_rank0": seconds, "cpu_seconds_rank0": cpu_seconds,
                    "shards_done_this_run_rank0": len(todo)}
            if not no_stats:
                stats, top1 = compute_stats(out, folder, k, L, acc, in_acc)
                result.stats = stats
                atomic_save_json(os.path.join(out, "stats.json"), stats)
                plot_sizes(out, top1)
            atomic_save_json(meta_path, meta)
            result.meta = meta
            print(f"mlcd assign: {folder.total} embeddings -> top-{L} of {k} centres ({backend}"
                  f"{', approx' if approx else ''}) in {out}", file=sys.stderr)
        barrier()
        return result


# ------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    """``mlcd assign``'s command line: the flags of :func:`build_parser` -> :func:`assign`."""
    a = build_parser().parse_args(argv)
    assign(a.emb, a.centroids, a.out, topk=a.topk, threshold=a.threshold, approx=a.approx, nlist=a.nlist,
           nprobe=a.nprobe, recall_rows=a.recall_sample, target_recall=a.target_recall, backend=a.backend,
           cand_dtype=a.cand_dtype, gpu=a.gpu, chunk=a.chunk, threads=a.threads, embedder=a.embedder,
           overwrite=a.overwrite, no_stats=a.no_stats)
    return 0


if __name__ == "__main__":
    from clustering import assign as _stage  # the module under its own name, as `mlcd assign` runs it
    from mlcd_core.stage import run_main

    sys.exit(run_main("assign", _stage.main, sys.argv[1:]))
