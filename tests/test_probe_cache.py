"""`mlcd probe`: the feature cache follows --train / --test, and test classes are matched by name."""
import json

import numpy as np
import pytest
from PIL import Image

from mlcd_train import probe
from mlcd_train.data import shards
from mlcd_train.utils.errors import MLCDError

COLOURS = {"cat": (220, 30, 30), "dog": (30, 220, 30), "fish": (30, 30, 220)}


def _split(root, classes, n, seed):
    """Shards of ``n`` noisy 8x8 images per class, each class its own colour."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            pixels = np.clip(np.array(COLOURS[c]) + rng.normal(0, 20, (8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    out = root.with_name(root.name + "_sh")
    assert shards.main(["--input", str(root), "--out", str(out)]) == 0
    return out


def _argv(train, test, out):
    return ["--embedder", "pca", "--train", str(train), "--test", str(test), "--out", str(out),
            "--workers", "0", "--pca-dim", "4", "--pca-image-size", "8", "--device", "cpu",
            "--l2-grid", "0.01", "--knn-k", "3"]


def test_cached_features_are_reused_only_for_the_same_shards(tmp_path, monkeypatch):
    a = _split(tmp_path / "a", ["cat", "dog"], 6, seed=0)
    b = _split(tmp_path / "b", ["cat", "dog"], 3, seed=1)
    args = probe.build_parser().parse_args(_argv(a, b, tmp_path / "out"))
    _, data = probe.features_for(args.embedder, str(a), str(b), args.out, args)
    assert (len(data["train"][1]), len(data["test"][1])) == (12, 6)
    # the splits swapped: other shards, so both are embedded again (not the cached a / b features)
    _, data = probe.features_for(args.embedder, str(b), str(a), args.out, args)
    assert (len(data["train"][1]), len(data["test"][1])) == (6, 12)
    from clustering import embed

    def no_embed(*args, **kwargs):  # the probe calls the stage's function
        raise AssertionError("features were cached, embed must not run")

    monkeypatch.setattr(embed, "embed", no_embed)
    _, again = probe.features_for(args.embedder, str(b), str(a), args.out, args)
    assert np.array_equal(again["train"][0], data["train"][0])
    # the test folder rewritten in place (same path, other images): its features are stale
    (tmp_path / "a" / "dog" / "0.png").unlink()
    assert shards.main(["--input", str(tmp_path / "a"), "--out", str(a), "--overwrite"]) == 0
    with pytest.raises(AssertionError, match="embed must not run"):
        probe.features_for(args.embedder, str(b), str(a), args.out, args)


def test_test_class_ids_are_matched_to_training_ids_by_name(tmp_path):
    train = _split(tmp_path / "train", ["cat", "dog", "fish"], 6, seed=0)
    test = _split(tmp_path / "test", ["cat", "fish"], 4, seed=1)  # fish is id 1 here, 2 in train
    assert json.loads((test / "classes.json").read_text()) == {"0": "cat", "1": "fish"}
    out = tmp_path / "out"
    assert probe.main(_argv(train, test, out) + ["--json", str(out / "r.json")]) == 0
    res = json.loads((out / "r.json").read_text())
    assert res["knn"]["top1"] == 1.0 and res["linear"]["top1"] == 1.0  # 0.5 with raw test ids
    # a test class the training split lacks is an error naming both files
    (test / "classes.json").write_text(json.dumps({"0": "cat", "1": "bird"}))
    with pytest.raises(MLCDError, match=r"test_sh/classes.json: class 'bird' is not in .*train_sh/classes.json"):
        probe.main(_argv(train, test, out))
