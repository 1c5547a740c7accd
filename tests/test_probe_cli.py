"""`mlcd probe` on real shards: features embedded through the clustering registry, cached, scored."""
import json

import numpy as np
import pytest
from PIL import Image

from mlcd_train import probe
from mlcd_train.utils.errors import MLCDError
from tests.fixtures import make_sample_shards


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe_cli")
    return (make_sample_shards(tmp, "train", n=400, shard_size=200),
            make_sample_shards(tmp, "test", n=200, shard_size=200), tmp)


@pytest.mark.slow  # pca fitted on 3072 pixel values (a 3072 x 3072 eigh): ~15 s of CPU
def test_probe_pca_scores_cached_features_and_reuses_them(splits, monkeypatch):
    train, test, tmp = splits
    out = tmp / "out"
    argv = ["--embedder", "pca", "--train", str(train), "--test", str(test), "--out", str(out),
            "--workers", "0", "--pca-dim", "32", "--l2-grid", "1e-4,1e-2,1"]
    assert probe.main(argv) == 0
    [res_path] = list(out.glob("probe-*.json"))
    res = json.loads(res_path.read_text())
    fdir = out / "features" / probe.embedder_slug("pca")
    assert res["features"] == str(fdir)
    xtr, ytr = np.load(fdir / "train.npy"), np.load(fdir / "train.cls.npy")
    xte, yte = np.load(fdir / "test.npy"), np.load(fdir / "test.cls.npy")
    assert xtr.shape == (400, 32) and xte.shape == (200, 32)
    # labels travel with their features: the shipped sample's labels, in IDX order
    from mlcd_train.data.sample import sample_paths
    from mlcd_train.data.shards import read_idx

    assert sorted(ytr.tolist()) == sorted(read_idx(sample_paths("train")[1])[:400].tolist())
    # the written figures are the classifiers' on exactly these cached features
    lin = probe.linear_probe(xtr, ytr, xte, yte, l2_grid=[1e-4, 1e-2, 1.0])
    knn = probe.knn_classify(xtr, ytr, xte, yte)
    assert res["linear"]["top1"] == pytest.approx(lin["top1"]) and res["knn"]["top1"] == pytest.approx(knn["top1"])
    # pixels-PCA features separate Fashion-MNIST classes far above chance (10%): features
    # and labels are aligned row by row (a shuffled join would score ~10%)
    assert res["linear"]["top1"] > 0.5 and res["knn"]["top1"] > 0.5

    # a second run reads the cache and never embeds again
    from clustering import embed

    def no_embed(*args, **kwargs):  # the probe calls the stage's function
        raise AssertionError("features were cached, embed must not run")

    monkeypatch.setattr(embed, "embed", no_embed)
    assert probe.main(argv + ["--no-linear"]) == 0
    assert json.loads(res_path.read_text())["knn"]["top1"] == pytest.approx(knn["top1"])


@pytest.mark.slow  # pca fitted on 3072 pixel values (a 3072 x 3072 eigh): ~15 s of CPU
def test_probe_refuses_shards_without_ground_truth(splits, tmp_path):
    from mlcd_train.data import shards

    _, test, _ = splits
    src = tmp_path / "flat"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):  # images at the top level of a folder carry no class
        Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(src / f"im{i}.png")
    assert shards.main(["--input", str(src), "--out", str(tmp_path / "sh")]) == 0
    with pytest.raises(MLCDError, match="shard-000000.*ground-truth"):
        probe.main(["--embedder", "pca", "--train", str(tmp_path / "sh"), "--test", str(test),
                    "--out", str(tmp_path / "out"), "--workers", "0", "--pca-dim", "8"])
