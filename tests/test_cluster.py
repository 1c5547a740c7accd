"""mlcd cluster: recovers a Gaussian mixture, distributed Lloyd's == single process, bad input."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from clustering import kmeans, store
from mlcd_train.utils.errors import MLCDError
from tests.dist_utils import run_distributed


def make_mixture_emb(root, n_shards=3, n=400, d=16, k=8, noise=0.05, seed=0, embedder="test:mixture"):
    """An EMB folder of unit vectors around k random unit means; returns (means, labels per shard)."""
    rng = np.random.default_rng(seed)
    means = store.normalise(rng.normal(size=(k, d)))
    counts, truth = {}, {}
    for s in range(n_shards):
        name = f"part-{s:06d}"
        lab = rng.integers(0, k, n)
        x = means[lab] + noise * rng.normal(size=(n, d))
        store.write_shard(root, name, x, [f"{name}-{i:05d}" for i in range(n)], lab)
        counts[name] = n
        truth[name] = lab
    store.write_meta(root, embedder, d, counts)
    return means, truth


def _cluster(emb, out, *extra, k=8):
    assert kmeans.main(["--emb", str(emb), "--k", str(k), "--out", str(out), "--threads", "1", *extra]) == 0
    return np.load(os.path.join(out, "centroids.npy")), json.load(open(os.path.join(out, "meta.json")))


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb")
    means, truth = make_mixture_emb(root)
    return root, means, truth


@pytest.mark.parametrize("extra", [
    ("--init", "kmeans++"),
    ("--init", "kmeans++", "--backend", "torch"),
    ("--init", "kmeans++", "--method", "two-level"),
])
def test_recovers_mixture(mixture, tmp_path, extra):
    root, means, truth = mixture
    c, meta = _cluster(root, tmp_path / "cl", *extra)
    assert c.shape == (8, 16) and c.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1, atol=1e-5)
    # one centre per mixture component, each close to its mean
    sim = means @ c.T
    assert sorted(sim.argmax(axis=1).tolist()) == list(range(8))
    assert sim.max(axis=1).min() > 0.99
    assert meta["n_train"] == meta["n_total"] == 1200 and not meta["subsampled"]
    assert meta["iterations"] == len(meta["objective"]) >= 1
    # Lloyd's never makes the objective worse (sum of similarities, maximised)
    obj = meta["objective"] if meta["method"] == "flat" else meta["coarse_objective"]
    assert all(b >= a - 1e-3 for a, b in zip(obj, obj[1:]))


def test_subsample_is_recorded_and_faiss_does_not_subsample_again(mixture, tmp_path):
    root, _, _ = mixture
    c, meta = _cluster(root, tmp_path / "cl", "--max-points-per-centroid", "50", "--init", "kmeans++")
    assert meta["n_train"] == 8 * 50 and meta["subsampled"]
    # the objective is a sum over the points actually used: all 400, each similarity ~0.97
    assert 0.9 * 400 < meta["objective"][-1] <= 400


def test_deterministic_for_seed(mixture, tmp_path):
    root, _, _ = mixture
    a, _ = _cluster(root, tmp_path / "a", "--seed", "3", "--k", "12")
    b, _ = _cluster(root, tmp_path / "b", "--seed", "3", "--k", "12")
    c, _ = _cluster(root, tmp_path / "c", "--seed", "4", "--k", "12")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_torch_lloyd_equals_faiss_from_same_init(mixture):
    root, _, _ = mixture
    emb = store.open_emb(root)
    x = store.gather(emb, np.arange(emb.total))
    init = kmeans.initial_centroids(x, 12, "random", 5)
    cf, sf = kmeans.faiss_kmeans(x, init, 4, 5)
    ct, st = kmeans.torch_lloyd(x, init, 4, 5)
    # faiss splits empty clusters at random: this data and init have none, so both must agree
    assert all(s["nsplit"] == 0 for s in sf) and all(s["nsplit"] == 0 for s in st)
    np.testing.assert_allclose(ct, cf, atol=1e-4)
    np.testing.assert_allclose([s["obj"] for s in st], [s["obj"] for s in sf][: len(st)], rtol=1e-5)


def _dist_cluster(rank, world, emb, out, k, x, init):
    # 1) the whole stage under 2 ranks; 2) Lloyd's itself from duplicated centres (empty clusters)
    kmeans.main(["--emb", emb, "--k", str(k), "--out", out, "--method", "distributed", "--niter", "6",
                 "--init", "random", "--seed", "2"])
    return kmeans.torch_lloyd(np.array_split(x, world)[rank], init, 5, 1)


@pytest.mark.slow
def test_distributed_lloyd_equals_single_process(mixture, tmp_path):
    root, _, _ = mixture
    k = 12
    single, ms = _cluster(root, tmp_path / "one", "--method", "distributed", "--niter", "6", "--init", "random",
                          "--seed", "2", k=k)
    emb = store.open_emb(root)
    x = store.gather(emb, np.arange(emb.total))
    init = np.concatenate([x[:6], x[:2]])  # duplicated centres: two start empty and get split
    c1, s1 = kmeans.torch_lloyd(x, init, 5, 1)
    assert s1[0]["nsplit"] == 2
    results = run_distributed(_dist_cluster, 2, (str(root), str(tmp_path / "two"), k, x, init))
    two = np.load(tmp_path / "two" / "centroids.npy")
    mt = json.load(open(tmp_path / "two" / "meta.json"))
    assert mt["world_size"] == 2 and ms.get("world_size", 1) == 1
    np.testing.assert_allclose(two, single, atol=1e-6)
    np.testing.assert_allclose(mt["objective"], ms["objective"], rtol=1e-9)
    assert mt["nsplit"] == ms["nsplit"]
    for c2, s2 in results:
        np.testing.assert_allclose(c2, c1, atol=1e-6)
        assert [s["nsplit"] for s in s2] == [s["nsplit"] for s in s1]
        np.testing.assert_allclose([s["obj"] for s in s2], [s["obj"] for s in s1], rtol=1e-9)


def test_allocate_two_level():
    a = kmeans.allocate(np.array([100, 10, 1, 0, 50]), 20)
    assert a.sum() == 20 and a[3] == 0 and a[2] == 1 and (a <= [100, 10, 1, 0, 50]).all()
    assert a[0] > a[4] > a[1]


# ----------------------------------------------------------------------------- bad input

def test_k_larger_than_n(mixture, tmp_path):
    root, _, _ = mixture
    with pytest.raises(MLCDError, match="meta.json.*k=5000 is larger"):
        kmeans.main(["--emb", str(root), "--k", "5000", "--out", str(tmp_path / "cl")])
    assert not (tmp_path / "cl").exists()


def test_nan_and_zero_rows_named(tmp_path):
    make_mixture_emb(tmp_path / "e", n_shards=2, n=50)
    p = tmp_path / "e" / "part-000001.npy"
    x = np.load(p)
    x[17] = np.nan
    np.save(p, x)
    with pytest.raises(MLCDError, match=r"part-000001\.npy: row 17 .*NaN"):
        kmeans.main(["--emb", str(tmp_path / "e"), "--k", "4", "--out", str(tmp_path / "cl")])
    x[17] = 0
    np.save(p, x)
    with pytest.raises(MLCDError, match=r"part-000001\.npy: row 17 .*zero norm"):
        kmeans.main(["--emb", str(tmp_path / "e"), "--k", "4", "--out", str(tmp_path / "cl")])


def test_missing_truncated_other_embedder(tmp_path):
    make_mixture_emb(tmp_path / "e", n_shards=2, n=50)
    out = tmp_path / "cl"
    _cluster(tmp_path / "e", out, k=4)
    before = (out / "centroids.npy").read_bytes(), (out / "meta.json").read_bytes()
    args = ["--emb", str(tmp_path / "e"), "--k", "4", "--out", str(out), "--overwrite"]
    with pytest.raises(MLCDError, match="made with 'test:mixture', not 'open_clip:ViT-B-32'"):
        kmeans.main(args + ["--embedder", "open_clip:ViT-B-32"])
    p = tmp_path / "e" / "part-000000.npy"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(MLCDError, match=r"part-000000\.npy: truncated"):
        kmeans.main(args)
    p.unlink()
    with pytest.raises(MLCDError, match=r"part-000000\.npy: embeddings file not found"):
        kmeans.main(args)
    assert ((out / "centroids.npy").read_bytes(), (out / "meta.json").read_bytes()) == before



def test_rerun_of_another_run_refused_and_kill_between_writes_redone(tmp_path, monkeypatch):
    """A finished CL folder is kept only for the same run: another --k (or --emb, seed...)
    without --overwrite is an error, not "nothing to do" over the old centres.  An --overwrite
    killed after centroids.npy but before meta.json leaves no meta.json, so a rerun redoes it."""
    make_mixture_emb(tmp_path / "e", n_shards=2, n=50)
    out = tmp_path / "cl"
    _cluster(tmp_path / "e", out, k=4)
    with pytest.raises(MLCDError, match=r"cl/meta\.json: .* holds centres of another run \(differs in k: k=4\)"):
        kmeans.main(["--emb", str(tmp_path / "e"), "--k", "6", "--out", str(out)])
    _cluster(tmp_path / "e", out, k=4)  # the same run: nothing to do, no error

    import clustering.kmeans as km

    def killed(path, obj):
        raise KeyboardInterrupt

    monkeypatch.setattr(km, "atomic_save_json", killed)
    with pytest.raises(KeyboardInterrupt):
        kmeans.main(["--emb", str(tmp_path / "e"), "--k", "6", "--out", str(out), "--overwrite"])
    assert not (out / "meta.json").exists()
    monkeypatch.undo()
    cent, meta = _cluster(tmp_path / "e", out, k=6)  # no --overwrite: the half-written run is redone
    assert cent.shape == (6, 16) and meta["k"] == 6
