"""mlcd assign: top-L equals brute force, torch backend equals faiss, threshold, resume, stats, bad input."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from clustering import assign, store
from clustering.search import FaissSearcher, TorchSearcher
from mlcd_train.utils.errors import MLCDError
from mlcd_train.utils.io import atomic_save_json
from tests.test_cluster import make_mixture_emb


@pytest.fixture()
def setup(tmp_path):
    root = tmp_path / "emb"
    means, truth = make_mixture_emb(root, n_shards=3, n=300, d=16, k=8, noise=0.3)
    rng = np.random.default_rng(1)
    cent = store.normalise(rng.normal(size=(40, 16))).astype(np.float32)
    cdir = tmp_path / "cl"
    cdir.mkdir()
    np.save(cdir / "centroids.npy", cent)
    atomic_save_json(cdir / "meta.json", {"k": 40, "embedder": "test:mixture"})
    return root, cdir / "centroids.npy", cent, truth


def _run(root, cpath, out, *extra, L=5):
    return assign.main(["--emb", str(root), "--centroids", str(cpath), "--topk", str(L), "--out", str(out),
                        "--chunk", "128", "--threads", "1", *extra])


def test_topl_equals_bruteforce_numpy(setup, tmp_path):
    root, cpath, cent, truth = setup
    out = tmp_path / "lbl"
    assert _run(root, cpath, out) == 0
    emb = store.open_emb(root)
    for sh in emb.shards:
        x = np.load(sh.path).astype(np.float32)
        sims = x @ cent.T
        want = np.argsort(-sims, axis=1, kind="stable")[:, :5]
        got = np.load(out / f"{sh.name}.labels.npy")
        assert got.dtype == np.int32 and got.shape == (300, 5)
        np.testing.assert_array_equal(got, want)
        sc = np.load(out / f"{sh.name}.scores.npy")
        assert sc.dtype == np.float16
        np.testing.assert_allclose(sc, np.take_along_axis(sims, want, 1), atol=2e-3)
        np.testing.assert_array_equal(np.load(out / f"{sh.name}.keys.npy"), np.load(sh.keys_path))
    meta = json.load(open(out / "meta.json"))
    assert (meta["k"], meta["topk"], meta["embedder"], meta["complete"]) == (40, 5, "test:mixture", True)
    assert meta["centroids"] == str(cpath.resolve())
    stats = json.load(open(out / "stats.json"))
    all_top1 = np.concatenate([np.argmax(np.load(sh.path).astype(np.float32) @ cent.T, 1) for sh in emb.shards])
    sizes = np.bincount(all_top1, minlength=40)
    assert stats["top1"]["empty"] == int((sizes == 0).sum()) and stats["top1"]["max"] == int(sizes.max())
    assert stats["topL"]["mean"] == pytest.approx(900 * 5 / 40)
    # purity by hand: each centre's majority ground-truth class
    cls = np.concatenate([truth[sh.name] for sh in emb.shards])
    pur = sum(np.bincount(cls[all_top1 == c]).max() for c in range(40) if sizes[c]) / len(cls)
    assert stats["purity_top1"] == pytest.approx(pur)
    assert (out / "cluster_sizes.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("cand", ["bfloat16", "float32"])
def test_torch_backend_equals_faiss(cand):
    rng = np.random.default_rng(0)
    x = store.normalise(rng.normal(size=(500, 32))).astype(np.float32)
    c = store.normalise(rng.normal(size=(300, 32))).astype(np.float32)
    Df, If = FaissSearcher(c).search(x, 8)
    ts = TorchSearcher(c, device="cpu", cand_dtype=cand, extra=4)
    Dt, It = ts.search(x, 8)
    np.testing.assert_array_equal(It, If)
    np.testing.assert_allclose(Dt, Df, atol=1e-5)
    if cand == "bfloat16":  # random data has near ties: the exact fallback must have been exercised
        assert 0 < ts.n_fallback < 500
        ts.rerank_bytes = 7 * 12 * 32 * 4  # re-rank in blocks of 7 rows (500 = 71 x 7 + 3)
        Db, Ib = ts.search(x, 8)
        np.testing.assert_array_equal(Ib, If)
        np.testing.assert_allclose(Db, Df, atol=1e-5)


def test_threshold_keeps_top1_and_pads(setup, tmp_path):
    root, cpath, cent, _ = setup
    out = tmp_path / "lbl"
    assert _run(root, cpath, out, "--threshold", "0.3") == 0
    sh = store.open_emb(root).shards[0]
    sims = np.sort(np.load(sh.path).astype(np.float32) @ cent.T, axis=1)[:, ::-1][:, :5]
    lab = np.load(out / f"{sh.name}.labels.npy")
    sc = np.load(out / f"{sh.name}.scores.npy")
    assert (lab[:, 0] >= 0).all()
    keep = sims.astype(np.float16).astype(np.float32) > 0.3  # judged as stored
    keep[:, 0] = True
    np.testing.assert_array_equal(lab >= 0, keep)
    assert np.isneginf(sc[~keep]).all()


def test_approx_reports_recall(setup, tmp_path):
    root, cpath, cent, _ = setup
    out = tmp_path / "lbl"
    assert _run(root, cpath, out, "--approx", "--nlist", "4", "--nprobe", "4") == 0
    rec = json.load(open(out / "meta.json"))["search"]["recall"]
    assert rec["recall_at_L"] == 1.0  # nprobe == nlist visits every centre: exact
    assert _run(root, cpath, tmp_path / "l2", "--approx", "--nlist", "8", "--nprobe", "1") == 0
    rec = json.load(open(tmp_path / "l2" / "meta.json"))["search"]["recall"]
    assert 0 < rec["recall_at_L"] < 1 and rec["sample"] == 900


def test_target_recall_picks_smallest_nprobe(setup, tmp_path, capsys):
    root, cpath, cent, _ = setup
    exact = tmp_path / "exact"
    assert _run(root, cpath, exact) == 0
    for target in (0.6, 1.0):
        out = tmp_path / f"t{target}"
        assert _run(root, cpath, out, "--approx", "--nlist", "8", "--target-recall", str(target)) == 0
        search = json.load(open(out / "meta.json"))["search"]
        curve = search["nprobe_curve"]
        assert [c["nprobe"] for c in curve] == [1, 2, 4, 8][: len(curve)]
        assert curve[-1]["recall_at_L"] >= target  # reached ...
        assert all(c["recall_at_L"] < target for c in curve[:-1])  # ... first at the chosen nprobe
        assert search["nprobe"] == curve[-1]["nprobe"] and search["recall"]["sample"] == 900
        # more than a quarter of the lists visited: told that IVF will not beat exact search
        assert ("expect no speed-up" in capsys.readouterr().err) == (search["nprobe"] * 4 > 8)
        # the recall sample is the whole corpus here: the labels reach the target against exact search
        hit = sum(len(set(a) & set(e)) for sh in store.open_emb(root).shards
                  for a, e in zip(np.load(out / f"{sh.name}.labels.npy").tolist(),
                                  np.load(exact / f"{sh.name}.labels.npy").tolist()))
        assert hit / (900 * 5) == pytest.approx(search["recall"]["recall_at_L"])
    with pytest.raises(MLCDError, match="--target-recall needs --approx"):
        _run(root, cpath, tmp_path / "bad", "--target-recall", "0.9")


def test_resume_skips_finished_shards(setup, tmp_path, monkeypatch):
    root, cpath, _, _ = setup
    out = tmp_path / "lbl"
    assert _run(root, cpath, out) == 0
    # simulated crash while shard 1 was written: its keys (written last) never landed, and the
    # temporary file of its labels is left behind
    os.unlink(out / "part-000001.keys.npy")
    (out / f".part-000001.labels.npy.{os.getpid()}.tmp").write_bytes(b"half")
    done = []
    real = assign.assign_shard
    monkeypatch.setattr(assign, "assign_shard", lambda s, sh, *a, **k: done.append(sh.name) or real(s, sh, *a, **k))
    mtimes = {p: os.stat(out / p).st_mtime_ns for p in ("part-000000.labels.npy", "part-000002.labels.npy")}
    assert _run(root, cpath, out) == 0
    assert done == ["part-000001"]
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    assert {p: os.stat(out / p).st_mtime_ns for p in mtimes} == mtimes
    assert (out / "part-000001.keys.npy").exists()
    assert _run(root, cpath, out, "--overwrite") == 0
    assert done == ["part-000001"] + [f"part-00000{i}" for i in range(3)]


def test_stats_from_memory_equal_stats_read_back(setup, tmp_path):
    """stats.json is accumulated from the shards labelled in this run and read back for the
    others: a fresh run, a resumed run and a pass over the files alone give the same stats."""
    root, cpath, _, _ = setup
    out = tmp_path / "lbl"
    assert _run(root, cpath, out) == 0
    fresh = json.load(open(out / "stats.json"))
    assert "purity_top1" in fresh  # the shards carry classes: every part of the stats is compared
    os.unlink(out / "part-000001.keys.npy")  # resume: shard 1 from memory, 0 and 2 from disk
    assert _run(root, cpath, out) == 0
    resumed = json.load(open(out / "stats.json"))
    from_files, _ = assign.compute_stats(str(out), store.open_emb(root), 40, 5)
    for other in (resumed, from_files):
        assert other.keys() == fresh.keys()
        for key, value in fresh.items():
            assert other[key] == (pytest.approx(value) if isinstance(value, float) else value), key


def test_crash_during_overwrite_leaves_no_stale_shard_marked_done(setup, tmp_path, monkeypatch):
    """--overwrite with new centres, killed after shard 0: a plain rerun must redo shards 1 and 2
    (their old keys no longer mark them finished) and end equal to a clean run."""
    root, cpath, cent, _ = setup
    out = tmp_path / "lbl"
    assert _run(root, cpath, out) == 0
    cdir2 = tmp_path / "cl2"
    cdir2.mkdir()
    cent2 = store.normalise(np.random.default_rng(7).normal(size=(40, 16))).astype(np.float32)
    np.save(cdir2 / "centroids.npy", cent2)
    atomic_save_json(cdir2 / "meta.json", {"k": 40, "embedder": "test:mixture"})
    real = assign.assign_shard

    def dies_on_second(s, sh, *a, **k):
        if sh.name == "part-000001":
            raise KeyboardInterrupt  # the job is killed while shard 1 is searched
        return real(s, sh, *a, **k)

    monkeypatch.setattr(assign, "assign_shard", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        _run(root, cdir2 / "centroids.npy", out, "--overwrite")
    # shard 0 was handed to the background writer before the kill: it landed whole
    assert (out / "part-000000.keys.npy").exists()
    assert not (out / "part-000001.keys.npy").exists() and not (out / "part-000002.keys.npy").exists()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    monkeypatch.setattr(assign, "assign_shard", real)
    assert _run(root, cdir2 / "centroids.npy", out) == 0
    assert _run(root, cdir2 / "centroids.npy", tmp_path / "clean") == 0
    for sh in store.open_emb(root).shards:
        for kind in ("labels", "scores", "keys"):
            np.testing.assert_array_equal(np.load(out / f"{sh.name}.{kind}.npy"),
                                          np.load(tmp_path / "clean" / f"{sh.name}.{kind}.npy"))


def test_writer_error_is_raised_and_earlier_shards_kept(setup, tmp_path, monkeypatch):
    root, cpath, _, _ = setup
    out = tmp_path / "lbl"
    real = assign.atomic_save_npy

    def disk_full(path, arr):
        if "part-000001.scores" in str(path):
            raise OSError(28, "No space left on device")
        real(path, arr)

    monkeypatch.setattr(assign, "atomic_save_npy", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _run(root, cpath, out)
    assert (out / "part-000000.keys.npy").exists()
    assert not (out / "part-000001.keys.npy").exists()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    monkeypatch.setattr(assign, "atomic_save_npy", real)
    assert _run(root, cpath, out) == 0
    assert json.load(open(out / "meta.json"))["complete"] is True


def test_keys_linked_or_copied_and_snapshot_of_emb(setup, tmp_path, monkeypatch):
    """LBL keys equal EMB keys whether hard-linked or (no link support) copied; an EMB shard
    redone later (atomic rename) does not change keys already in LBL."""
    root, cpath, _, _ = setup
    sh = store.open_emb(root).shards[0]
    want = np.load(sh.keys_path)
    dest = tmp_path / "a.keys.npy"
    store.copy_keys(sh, str(dest))
    store.copy_keys(sh, str(dest))  # again over itself (same inode): still there, no tmp left
    np.testing.assert_array_equal(np.load(dest), want)

    def no_links(*a, **k):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    store.copy_keys(sh, str(tmp_path / "b.keys.npy"))
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(tmp_path / "b.keys.npy"), want)
    assert sorted(os.listdir(tmp_path)) == ["a.keys.npy", "b.keys.npy", "cl", "emb"]
    from mlcd_train.utils.io import atomic_save_npy

    atomic_save_npy(sh.keys_path, np.array([f"new-{i}" for i in range(len(want))]))
    np.testing.assert_array_equal(np.load(dest), want)


def test_to_f32_equals_numpy_and_checks_rows():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(1000, 77)).astype(np.float16)  # not a multiple of the 32000-value pieces
    np.testing.assert_array_equal(store.to_f32(h), h.astype(np.float32))
    buf = np.empty((2000, 77), np.float32)
    y = store.to_f32(h, buf)
    assert np.shares_memory(y, buf) and y.shape == (1000, 77)
    np.testing.assert_array_equal(y, h.astype(np.float32))
    h.flags.writeable = False  # a read-only (memory-mapped) array takes numpy's path
    np.testing.assert_array_equal(store.to_f32(h), h.astype(np.float32))
    sh = store.EmbShard("s", "EMB/s.npy", "EMB/s.keys.npy", None, 1000, 77, None)
    for bad, what in ((np.inf, "NaN/inf"), (-np.inf, "NaN/inf"), (np.nan, "NaN/inf"), (0.0, "zero norm")):
        x = h.astype(np.float32)
        if bad == 0.0:
            x[617] = 0
        else:
            x[617, 5] = bad
        with pytest.raises(MLCDError, match=rf"EMB/s\.npy: row 717 \(shard s\) has {what}"):
            store.check_rows(x, sh, 100)
    big = np.full((3, 77), 1e30, np.float32)  # finite, only the squared norm overflows: accepted
    store.check_rows(big, sh, 0)


def test_run_reader_reads_every_row_once_in_order(setup):
    """store.iter_raw_run: every row of every shard once, shard by shard, in chunks."""
    root, _, _, _ = setup
    emb = store.open_emb(root)
    got = list(store.iter_raw_run(emb.shards, 64))
    assert [(s.name, a) for s, a, _ in got] == [(sh.name, a) for sh in emb.shards for a in range(0, sh.n, 64)]
    for sh in emb.shards:
        np.testing.assert_array_equal(np.concatenate([r for s, _, r in got if s is sh]), np.load(sh.path))


def test_prefetch_order_errors_and_early_close():
    import itertools
    import threading
    import time

    assert list(store.prefetch(iter(range(5)))) == list(range(5))

    def failing():
        yield 1
        yield 2
        raise ValueError("shard 3 unreadable")

    got = []
    with pytest.raises(ValueError, match="shard 3 unreadable"):
        for item in store.prefetch(failing()):
            got.append(item)
    assert got == [1, 2]  # items before the error are delivered, then the error is raised here
    before = set(threading.enumerate())
    g = store.prefetch(itertools.count())  # an endless producer blocked on the full queue
    assert next(g) == 0
    (producer,) = [t for t in threading.enumerate() if t not in before]
    time.sleep(0.05)  # let it fill the queue and block on the next put
    g.close()  # must stop the producer thread, not leave it blocked forever
    producer.join(2)
    assert not producer.is_alive()


def test_default_chunk_gives_the_same_labels(setup, tmp_path):
    root, cpath, _, _ = setup
    common = ["--emb", str(root), "--centroids", str(cpath), "--topk", "5", "--threads", "1"]
    assert assign.main(common + ["--out", str(tmp_path / "a")]) == 0  # default chunk (4096 on CPU)
    assert assign.main(common + ["--out", str(tmp_path / "b"), "--chunk", "7"]) == 0
    for name in ("part-000000", "part-000002"):
        for kind in ("labels", "scores"):
            np.testing.assert_array_equal(np.load(tmp_path / "a" / f"{name}.{kind}.npy"),
                                          np.load(tmp_path / "b" / f"{name}.{kind}.npy"))
    with pytest.raises(MLCDError, match="--chunk must be positive"):
        assign.main(common + ["--out", str(tmp_path / "c"), "--chunk", "-3"])


@pytest.mark.parametrize("padded", [False, True])
def test_label_stats_equal_bruteforce(padded):
    rng = np.random.default_rng(3)
    k, L = 30, 4
    lab = rng.integers(0, k, (500, L)).astype(np.int32)
    sc = rng.random((500, L)).astype(np.float16)
    if padded:  # --threshold pads with -1 / -inf, never in the first column
        drop = rng.random((500, L)) < 0.4
        drop[:, 0] = False
        lab[drop] = -1
        sc[drop] = -np.inf
    acc = assign.LabelStats(k, L)
    acc.add(lab[:200], sc[:200], None)
    acc.add(lab[200:], sc[200:], None)
    got = acc.result()
    valid = lab >= 0
    topl = np.bincount(lab[valid], minlength=k)
    assert got["topL"]["max"] == topl.max() and got["topL"]["empty"] == int((topl == 0).sum())
    assert got["topL"]["mean"] == pytest.approx(valid.sum() / k)
    assert got["labels_per_image_mean"] == pytest.approx(valid.sum() / 500)
    assert got["mean_similarity_topL"] == pytest.approx(sc[valid].astype(np.float64).mean())
    assert got["mean_similarity_top1"] == pytest.approx(sc[:, 0].astype(np.float64).mean())
    assert got["top1"]["max"] == np.bincount(lab[:, 0], minlength=k).max()


@pytest.mark.parametrize("search", [("--backend", "faiss"), ("--backend", "faiss", "--approx", "--nprobe", "2"),
                                    ("--backend", "torch"), ("--backend", "torch", "--cand-dtype", "bfloat16")],
                         ids=["faiss", "ivf", "torch", "torch-bf16"])
def test_bad_rows_found_from_the_scores(tmp_path, search):
    """assign checks rows through their search scores (check_by_scores): every kind of bad row is
    still named, with the first such row and the count, for every search path; a valid row whose
    scores are all 0 (orthogonal to every centre) is looked at and accepted."""
    rng = np.random.default_rng(5)
    d, n = 16, 700
    cent = store.normalise(rng.normal(size=(50, d))).astype(np.float32)
    cent[:, 3] = 0  # no centre uses dimension 3 ...
    cent = store.normalise(cent)
    cpath = tmp_path / "c.npy"
    np.save(cpath, cent)
    good = store.normalise(rng.normal(size=(n, d))).astype(np.float16)
    good[650] = 0
    good[650, 3] = 1  # ... so this unit row scores exactly 0 against all of them: valid
    cases = {"nan": (np.nan, "NaN/inf"), "inf": (np.inf, "NaN/inf"), "-inf": (-np.inf, "NaN/inf"),
             "zero": (0.0, "zero norm"), "tiny": (1e-8, "zero norm")}
    for case, (value, what) in cases.items():
        root = tmp_path / f"emb-{case}"
        root.mkdir()
        x = good.copy()
        for r in (517, 553):  # two bad rows in one chunk (rows 300-599)
            if case in ("zero", "tiny"):
                x[r] = 0
                x[r, 0] = value  # tiny: norm 6e-8 in float16, below the check's 1e-6
            else:
                x[r, 7] = value
        np.save(root / "s.npy", x)
        np.save(root / "s.keys.npy", np.array([f"k{i}" for i in range(n)]))
        store.write_meta(root, "test", d, {"s": n})
        with pytest.raises(MLCDError, match=rf"s\.npy: row 517 \(shard s\) has {what}.*\(2 such rows"):
            assign.main(["--emb", str(root), "--centroids", str(cpath), "--topk", "3", "--out",
                         str(tmp_path / f"lbl-{case}"), "--chunk", "300", "--threads", "1", *search])
        assert not (tmp_path / f"lbl-{case}" / "s.labels.npy").exists()
    root = tmp_path / "emb-good"
    root.mkdir()
    np.save(root / "s.npy", good)
    np.save(root / "s.keys.npy", np.array([f"k{i}" for i in range(n)]))
    store.write_meta(root, "test", d, {"s": n})
    assert assign.main(["--emb", str(root), "--centroids", str(cpath), "--topk", "3", "--out",
                        str(tmp_path / "lbl-good"), "--chunk", "300", "--threads", "1", *search]) == 0
    assert np.load(tmp_path / "lbl-good" / "s.scores.npy")[650, 0] == 0


# ----------------------------------------------------------------------------- bad input

def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_bad_inputs_named_and_nothing_damaged(setup, tmp_path):
    root, cpath, cent, _ = setup
    out = tmp_path / "lbl"
    assert _run(root, cpath, out) == 0
    before = _snapshot(out)
    ov = ("--overwrite",)
    # centres of another dimension
    bad_c = tmp_path / "c8.npy"
    np.save(bad_c, cent[:, :8])
    with pytest.raises(MLCDError, match=r"c8\.npy: centres have dimension 8.*have 16"):
        _run(root, bad_c, out, *ov)
    with pytest.raises(MLCDError, match=r"centroids\.npy: --topk 41 must be between 1 and k=40"):
        _run(root, cpath, out, *ov, L=41)
    # EMB from another embedder than the centres / than asked
    atomic_save_json(cpath.parent / "meta.json", {"k": 40, "embedder": "open_clip:ViT-L-14"})
    with pytest.raises(MLCDError, match=r"meta\.json: embeddings made with 'test:mixture', but the centres"):
        _run(root, cpath, out, *ov)
    atomic_save_json(cpath.parent / "meta.json", {"k": 40, "embedder": "test:mixture"})
    with pytest.raises(MLCDError, match="made with 'test:mixture', not 'pca'"):
        _run(root, cpath, out, *ov, "--embedder", "pca")
    # another run's settings into the same LBL without --overwrite
    with pytest.raises(MLCDError, match=r"meta\.json: .* holds labels of another run"):
        _run(root, cpath, out, L=3)
    # NaN in the last shard: named with its row; earlier shards may be redone, never damaged
    p = root / "part-000002.npy"
    x = np.load(p)
    x[123] = np.nan
    np.save(p, x)
    with pytest.raises(MLCDError, match=r"part-000002\.npy: row 123 \(shard part-000002\) has NaN"):
        _run(root, cpath, out, *ov)
    # truncated and missing embeddings
    data = p.read_bytes()
    p.write_bytes(data[:-100])
    with pytest.raises(MLCDError, match=r"part-000002\.npy: truncated"):
        _run(root, cpath, out, *ov)
    p.unlink()
    with pytest.raises(MLCDError, match=r"part-000002\.npy: embeddings file not found"):
        _run(root, cpath, out, *ov)
    after = _snapshot(out)
    assert after == before


def test_rerun_with_other_inputs_refused_not_reused(setup, tmp_path):
    """A finished LBL folder is "this run" only for the same embeddings and the same centres by
    content: new centres saved at the same path, or another EMB folder with the same shard
    names and sizes, are refused (not answered with the old labels); --overwrite redoes all."""
    root, cpath, cent, _ = setup
    out = tmp_path / "lbl"
    assert _run(root, cpath, out) == 0
    before = _snapshot(out)
    cent2 = store.normalise(np.random.default_rng(5).normal(size=(40, 16))).astype(np.float32)
    np.save(cpath, cent2)  # re-clustered into the same CL folder
    with pytest.raises(MLCDError, match=r"lbl/meta\.json: .* holds labels of another run \(differs in centroids_sha"):
        _run(root, cpath, out)
    root2 = tmp_path / "emb2"  # another corpus, same shard names and sizes
    make_mixture_emb(root2, n_shards=3, n=300, d=16, k=8, noise=0.3, seed=9)
    with pytest.raises(MLCDError, match=r"differs in centroids_sha, emb\b"):
        _run(root2, cpath, out)
    assert _snapshot(out) == before
    assert _run(root2, cpath, out, "--overwrite") == 0
    for sh in store.open_emb(root2).shards:
        x = store.read_rows(sh, 0, sh.n)
        top = np.argsort(-(x @ cent2.T), axis=1, kind="stable")[:, :5]
        np.testing.assert_array_equal(np.load(out / f"{sh.name}.labels.npy")[:, 0], top[:, 0])


def test_centres_from_other_weights_refused(setup, tmp_path):
    """Centres clustered from embeddings of other weights under the same embedder spec."""
    root, cpath, _, _ = setup
    meta = json.load(open(root / "meta.json"))
    atomic_save_json(root / "meta.json", {**meta, "embedder_info": {"spec": "test:mixture", "weights_sha": "aa"}})
    atomic_save_json(cpath.parent / "meta.json", {"k": 40, "embedder": "test:mixture",
                                                  "embedder_info": {"spec": "test:mixture", "weights_sha": "bb"}})
    with pytest.raises(MLCDError, match=r"emb/meta\.json: embeddings made with other weights \(weights_sha aa\)"):
        _run(root, cpath, tmp_path / "lbl")


def test_threshold_judged_on_the_stored_float16_score(tmp_path):
    """0.50013 > T = 0.50012 in float32, but it is stored as float16 0.5 <= T: the label is
    dropped, so no stored score of a kept label (beyond the top-1) is <= T."""
    root = tmp_path / "emb"
    store.write_shard(root, "s", np.array([[1.0, 0.0]] * 3, np.float32), ["a", "b", "c"])
    store.write_meta(root, "test:two", 2, {"s": 3})
    ang = [0.0, np.arccos(0.50013), np.arccos(0.6), np.arccos(0.3)]
    cent = np.array([[np.cos(a), np.sin(a)] for a in ang], np.float32)
    np.save(tmp_path / "c.npy", cent)
    out = tmp_path / "lbl"
    assert assign.main(["--emb", str(root), "--centroids", str(tmp_path / "c.npy"), "--topk", "4",
                        "--threshold", "0.50012", "--out", str(out), "--no-stats"]) == 0
    labels, scores = np.load(out / "s.labels.npy"), np.load(out / "s.scores.npy")
    np.testing.assert_array_equal(labels, [[0, 2, -1, -1]] * 3)
    assert (scores[:, 1:][labels[:, 1:] >= 0] > 0.50012).all()
