"""``mlcd assign`` against raw faiss search; peak memory on a 2M x 512 corpus; ``--approx``.

    python -m bench.bench_assign            # 500k x 256 vs k 4096; RSS on 2M x 512; approx k 100k
    python -m bench.bench_assign --quick    # 200k x 128 vs k 2048; RSS on 2M x 512; approx k 20k
    python -m bench.bench_assign --n 2000000 --throughput-only --repeats 3   # a larger corpus

Rows:
  * embeddings/s of ``mlcd assign`` (whole code path: fp16 EMB files streamed from disk in
    chunks, search, labels/scores/keys written, stats.json and cluster_sizes.png) / raw
    ``IndexFlatIP.search`` over the same rows already in memory as float32, same k and L
    (target >= 0.9); the same for the shard loop alone (what grows with the corpus: the
    plot and writing stats.json are a fixed ~0.2 s at the end), from the same runs;
  * peak RSS (VmHWM of a child process) of ``mlcd assign`` over 2M x 512 float16
    embeddings (2 GB on disk) against the 1.5 GB budget (ratio = ours / budget, target <= 1);
  * ``--backend torch`` against ``--backend faiss`` (faiss-cpu), whole command: on a CUDA
    machine this is the GPU torch path (bf16 candidates + exact re-rank) against faiss on
    the CPU; without one, torch's fp32 CPU path;
  * ``--approx`` (IVF over the centres) at k = 100k: speed-up over exact search on the same
    queries, with recall@L on them, for random and for clustered centres, at nprobe 16, 64
    and the nprobe that ``--target-recall 0.95`` picks (tuned on 5000 of the queries).
Medians of ``repeats`` runs.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.bench_cluster import make_data, write_emb
from bench.common import cli, row
from mlcd_core.args import positive_int
from clustering import assign

L = 8


def _rss_child(emb: str, cent: str, out: str) -> tuple[float, float]:
    """Peak RSS (GB) and seconds of ``mlcd assign`` run in a fresh process.

    The peak is VmHWM of /proc/self/status, the high-water mark of the child's own address
    space: ``ru_maxrss`` is not used because Linux carries it over a fork + exec, so a child
    of this (large) benchmark process would report the parent's size."""
    code = ("import sys, time; from clustering.assign import main; t=time.perf_counter(); "
            f"main(['--emb', {emb!r}, '--centroids', {cent!r}, '--topk', '{L}', '--out', {out!r}]); "
            "print(time.perf_counter()-t); "
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0])")
    env = dict(os.environ, MLCD_QUIET="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    lines = res.stdout.strip().splitlines()
    return int(lines[-1]) / 1024 ** 2, float(lines[-2])  # VmHWM is in kB


def write_big_emb(root: str, n: int, d: int, shards: int = 40, seed: int = 0) -> None:
    """n x d unit float16 rows without holding them all in memory."""
    from clustering import store

    rng = np.random.default_rng(seed)
    counts = {}
    for i, m in enumerate(np.diff(np.linspace(0, n, shards + 1).astype(int))):
        name = f"big-{i:06d}"
        store.write_shard(root, name, rng.standard_normal((m, d), dtype=np.float32),
                          np.array([f"{name}-{j}" for j in range(m)]))
        counts[name] = int(m)
    store.write_meta(root, "bench:random", d, counts)


def _torch_backend_row(args: list[str], meta_path: str, n: int, repeats: int) -> dict:
    """``--backend torch`` (CUDA when there is one: bf16 candidates + exact fp32 re-rank; on a
    CPU fp32 matmul + top-k) against ``--backend faiss`` on the CPU, same data, whole command."""
    import torch

    base = [a for a in args if a not in ("--backend", "faiss")]
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    times = {"torch": [], "faiss": []}
    meta = {}
    for r in range(-1, repeats):  # r = -1: an untimed warm-up of each (CUDA context, kernels)
        for backend in (times if r % 2 == 0 else list(times)[::-1]):  # interleaved, alternating
            t0 = time.perf_counter()
            assign.main(base + ["--backend", backend])
            if r >= 0:
                times[backend].append(time.perf_counter() - t0)
            if backend == "torch":
                meta = json.load(open(meta_path))["search"]
    tt, tf = statistics.median(times["torch"]), statistics.median(times["faiss"])
    return row("assign", "embeddings/s, --backend torch", n / tt, n / tf, "--backend faiss (faiss-cpu)", tf / tt,
               None, f"torch on {dev} (candidates {meta.get('cand_dtype')}, exact fallback rows "
                     f"{meta.get('exact_fallback_rows')}); whole command; median of {repeats}")


def run(quick: bool = False, repeats: int | None = None, n: int | None = None,
        throughput_only: bool = False) -> list[dict]:
    import faiss

    from clustering.search import FaissSearcher
    from clustering.store import normalise

    repeats = repeats or 5
    n_default, d, k = (200_000, 128, 2048) if quick else (500_000, 256, 4096)
    n = n or n_default
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        x = make_data(n, d)
        emb = os.path.join(tmp, "emb")
        write_emb(emb, x, shards=10)
        rng = np.random.default_rng(1)
        c = normalise(x[rng.choice(n, k, replace=False)] + 0.05 * rng.standard_normal((k, d)).astype(np.float32))
        cpath = os.path.join(tmp, "centroids.npy")
        np.save(cpath, c.astype(np.float32))
        args = ["--emb", emb, "--centroids", cpath, "--topk", str(L), "--out", os.path.join(tmp, "lbl"),
                "--overwrite", "--backend", "faiss"]
        index = faiss.IndexFlatIP(d)
        index.add(c)
        threads = faiss.omp_get_max_threads()
        meta_path = os.path.join(tmp, "lbl", "meta.json")

        def paired(clock, extra, loop_key, x):
            """Adjacent runs of ours and raw faiss on ``clock``: per-repeat rates (whole command,
            shard loop as timed by mlcd in meta.json, raw) and seconds outside the loop.  The
            order alternates: on the shared VM whichever of a pair ran second measured ~3 %
            faster, which a fixed order would book against one side."""
            whole, loop, raw, fixed = [], [], [], []
            for r in range(-1, repeats):  # r = -1: untimed warm-up of both (imports, caches, pages)
                def ours():
                    t0 = clock()
                    assign.main(args + extra)
                    return clock() - t0, json.load(open(meta_path))[loop_key]

                def ref():
                    t0 = clock()
                    index.search(x, L)
                    return clock() - t0

                if r % 2 == 0:
                    (w, lp), f = ours(), ref()
                else:
                    f, (w, lp) = ref(), ours()
                if r < 0:
                    continue
                whole.append(n / w)
                loop.append(n / lp)
                raw.append(n / f)
                fixed.append(w - lp)
            return whole, loop, raw, fixed

        def rate_rows(metric, whole, loop, raw, note_whole, note_loop):
            """Median rates and the median of the paired ratios, for the command and its loop."""
            med = statistics.median
            ref_name = "raw faiss IndexFlatIP.search"
            rw, rl = [a / b for a, b in zip(whole, raw)], [a / b for a, b in zip(loop, raw)]
            return [row("assign", metric, med(whole), med(raw), ref_name, med(rw), ">= 0.9",
                        f"{note_whole}; per repeat {[round(r, 3) for r in rw]}"),
                    row("assign", metric + ", shard loop", med(loop), med(raw), ref_name, med(rl), ">= 0.9",
                        f"{note_loop}; per repeat {[round(r, 3) for r in rl]}")]

        whole, loop, raw, fixed = paired(time.perf_counter, [], "seconds_rank0", x)
        rows += rate_rows("embeddings/s", whole, loop, raw,
                          f"N={n} d={d} k={k} L={L}; the whole command: fp16 files read, checked, searched, "
                          f"labels/scores/keys written, stats.json + plot ({statistics.median(fixed):.2f} s "
                          f"outside the shard loop: stats are summed during it, the plot is O(k)); "
                          f"{threads} threads; median of {repeats} paired ratios",
                          "the part that scales with the corpus: read + convert + check + search + write "
                          "(meta.json seconds_rank0), same runs as above")
        # the same on one thread, in CPU seconds: insensitive to other processes on a shared machine
        import torch

        torch_threads = torch.get_num_threads()
        faiss.omp_set_num_threads(1)
        try:
            whole, loop, raw, _ = paired(time.process_time, ["--threads", "1"], "cpu_seconds_rank0", x)
        finally:  # --threads 1 set both for the process
            faiss.omp_set_num_threads(threads)
            torch.set_num_threads(torch_threads)
        rows += rate_rows("embeddings/CPU-s", whole, loop, raw,
                          f"1 thread, process CPU time (all of ours: reading, writer thread, stats, plot); "
                          f"median of {repeats} paired ratios",
                          "1 thread, process CPU time of the shard loop (meta.json cpu_seconds_rank0, all "
                          "threads), same runs as above")
        rows.append(_torch_backend_row(args, meta_path, n, 3))
        del x

        if throughput_only:
            return rows
        # peak memory over 2M x 512 fp16 (2 GB on disk)
        big = os.path.join(tmp, "big")
        write_big_emb(big, 2_000_000, 512)
        kb = 256 if quick else 1024
        cb = normalise(np.random.default_rng(2).standard_normal((kb, 512)).astype(np.float32))
        cbp = os.path.join(tmp, "cb.npy")
        np.save(cbp, cb)
        gb, secs = _rss_child(big, cbp, os.path.join(tmp, "lbl_big"))
        rows.append(row("assign", "peak RSS GB", gb, 1.5, "budget", gb / 1.5, "<= 1.0",
                         f"2M x 512 fp16 EMB in 40 shards, k={kb}, L={L}; {2_000_000 / secs:.0f} emb/s"))
        import shutil

        shutil.rmtree(big)

        # --approx at large k: speed-up over exact and recall@L, on two kinds of centres:
        #  * random directions (no structure: the worst case for an IVF index);
        #  * centres drawn from clustered data (make_data), as k-means centres of real
        #    embeddings are, with queries near them.
        # For each: fixed nprobe 16 and 64, and the nprobe --target-recall 0.95 picks.
        ka, da, nq = (20_000, 128, 20_000) if quick else (100_000, 128, 50_000)
        rng = np.random.default_rng(3)
        for kind in ("random", "clustered"):
            if kind == "random":
                ca = normalise(rng.standard_normal((ka, da)).astype(np.float32))
            else:
                ca = make_data(ka, da, seed=4)
            # queries near the centres, as embeddings are (similarity to their own centre ~0.8)
            q = normalise(ca[rng.integers(0, ka, nq)]
                          + 0.75 / np.sqrt(da) * rng.standard_normal((nq, da)).astype(np.float32))
            exact = FaissSearcher(ca)
            te = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                _, Ie = exact.search(q, L)
                te.append(time.perf_counter() - t0)
            approx = FaissSearcher(ca, approx=True)
            tuned, curve = assign.tune_nprobe(approx, q[:5000], Ie[:5000], L, 0.95)
            for nprobe, how in ((16, "fixed"), (64, "fixed"), (tuned, "--target-recall 0.95")):
                approx.set_nprobe(nprobe)
                ta = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    _, Ia = approx.search(q, L)
                    ta.append(time.perf_counter() - t0)
                hit = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(Ia, Ie)) / (nq * L)
                sp = statistics.median(te) / statistics.median(ta)
                rows.append(row("assign", "approx speed-up", sp, 1.0, "exact IndexFlatIP", sp, None,
                                 f"{kind} centres k={ka} d={da}, {nq} queries, IVF nlist={approx.nlist} "
                                 f"nprobe={nprobe} ({how}); recall@{L}={hit:.3f}, "
                                 f"top-1 agreement {(Ia[:, 0] == Ie[:, 0]).mean():.3f}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    return cli(run, __doc__, options=(
        ("--n", dict(type=positive_int, default=None, help="corpus size of the throughput rows (the fixed "
                                                           "end-of-run cost weighs less as it grows)")),
        ("--throughput-only", dict(action="store_true", help="skip the peak-RSS and --approx rows"))), argv=argv)


if __name__ == "__main__":
    sys.exit(main())
