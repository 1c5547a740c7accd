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


def test_threshold_keeps_top1_and_pads(setup, tmp_path):
    root, cpath, cent, _ = setup
    out = tmp_path / "lbl"
    assert _run(root, cpath, out, "--threshold", "0.3") == 0
    sh = store.open_emb(root).shards[0]
    sims = np.sort(np.load(sh.path).astype(np.float32) @ cent.T, axis=1)[:, ::-1][:, :5]
    lab = np.load(out / f"{sh.name}.labels.npy")
    sc = np.load(out / f"{sh.name}.scores.npy")
    assert (lab[:, 0] >= 0).all()
    keep = sims > 0.3
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


def test_resume_skips_finished_shards(setup, tmp_path, monkeypatch):
    root, cpath, _, _ = setup
    out = tmp_path / "lbl"
    assert _run(root, cpath, out) == 0
    # simulated crash while shard 1 was written: its keys (written last) never landed
    os.unlink(out / "part-000001.keys.npy")
    done = []
    real = assign.assign_shard
    monkeypatch.setattr(assign, "assign_shard", lambda s, sh, *a, **k: done.append(sh.name) or real(s, sh, *a, **k))
    mtimes = {p: os.stat(out / p).st_mtime_ns for p in ("part-000000.labels.npy", "part-000002.labels.npy")}
    assert _run(root, cpath, out) == 0
    assert done == ["part-000001"]
    assert {p: os.stat(out / p).st_mtime_ns for p in mtimes} == mtimes
    assert (out / "part-000001.keys.npy").exists()
    assert _run(root, cpath, out, "--overwrite") == 0
    assert done == ["part-000001"] + [f"part-00000{i}" for i in range(3)]


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
