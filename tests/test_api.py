"""Every stage a Python function (issue 16): the functions give what the commands give, the
commands are thin layers over them, and the registries drive the choices."""
from __future__ import annotations

import inspect
import json
import os
import pydoc
import shutil

import numpy as np
import pytest
import torch

from clustering import assign, embed, kmeans, store
from clustering.embedders import embedder_kinds, get_embedder, register_embedder
from mlcd_core.errors import MLCDError
from tests.fixtures import make_random_shards
from tests.test_cluster import make_mixture_emb


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb")
    means, truth = make_mixture_emb(root)
    return root, means, truth


@pytest.mark.parametrize("fn", [kmeans.cluster, kmeans.cluster_folder, assign.assign, embed.embed])
def test_stage_functions_are_documented(fn):
    doc = inspect.getdoc(fn)
    assert doc and len(doc.splitlines()) >= 3
    text = pydoc.render_doc(fn, renderer=pydoc.plaintext)  # what help() prints
    assert fn.__name__ in text and doc.splitlines()[0] in text
    # every keyword of the function is named in its documentation or is an obvious flag
    assert inspect.signature(fn).return_annotation != inspect.Signature.empty


def test_cluster_over_an_array_equals_the_folder_run(mixture, tmp_path):
    """cluster(array) and cluster_folder(EMB) run the same k-means: the same centres (up to the
    array's rows being re-normalised in float32: EMB rows are float16 unit vectors)."""
    root, means, _ = mixture
    folder = store.open_emb(str(root))
    x = store.gather(folder, np.arange(folder.total))
    a = kmeans.cluster(x, 8, seed=3, init="kmeans++", threads=1)
    b = kmeans.cluster_folder(str(root), 8, str(tmp_path / "cl"), seed=3, init="kmeans++", threads=1)
    assert isinstance(a, kmeans.ClusterResult) and a.centroids.shape == (8, 16)
    np.testing.assert_allclose(a.centroids, b.centroids, atol=1e-5)
    np.testing.assert_array_equal(np.load(tmp_path / "cl" / "centroids.npy"), b.centroids)
    np.testing.assert_allclose(a.objective, b.objective, rtol=1e-5)
    assert a.iterations == b.iterations and a.method == b.method == "flat" and a.n_train == b.n_train == 1200
    assert b.meta == json.load(open(tmp_path / "cl" / "meta.json"))
    assert sorted((means @ a.centroids.T).argmax(axis=1).tolist()) == list(range(8))
    # the same run again: nothing to do, said by None
    assert kmeans.cluster_folder(str(root), 8, str(tmp_path / "cl"), seed=3, init="kmeans++", threads=1) is None


def test_stage_functions_restore_the_callers_thread_counts(mixture, tmp_path, monkeypatch):
    """cluster / cluster_folder / assign run with ``threads`` and put torch's and faiss's thread counts
    back afterwards, even on an error: before, a pipeline that clustered with threads=2 and then
    trained in the same process kept 2 threads (two such runs on 2 cores trained 3x slower)."""
    import faiss

    root, _, _ = mixture
    torch_before, faiss_before = torch.get_num_threads(), faiss.omp_get_max_threads()
    seen = []
    real_fit = kmeans._fit

    def spy(*args, **kwargs):  # the count inside the call is the one asked for
        seen.append((torch.get_num_threads(), faiss.omp_get_max_threads()))
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(kmeans, "_fit", spy)
    want = 3 if torch_before != 3 else 2
    try:
        torch.set_num_threads(1)
        faiss.omp_set_num_threads(1)
        x = store.gather(store.open_emb(str(root)), np.arange(50))
        kmeans.cluster(x, 4, niter=2, threads=want)
        kmeans.cluster_folder(str(root), 4, str(tmp_path / "cl"), niter=2, threads=want)
        assert seen == [(want, want), (want, want)]
        assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (1, 1)
        assign.assign(str(root), str(tmp_path / "cl" / "centroids.npy"), str(tmp_path / "lbl"), topk=2,
                      threads=want)
        assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (1, 1)
        with pytest.raises(MLCDError):  # an error inside the call restores them too
            kmeans.cluster(np.ones((4, 3)), 9, threads=want)
        assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (1, 1)
        kmeans.cluster(x, 4, niter=2)  # threads=0: left as they are
        assert seen[-1] == (1, 1)
    finally:
        torch.set_num_threads(torch_before)
        faiss.omp_set_num_threads(faiss_before)


def test_cluster_refuses_bad_input_as_mlcd_error():
    with pytest.raises(MLCDError, match=r"k=9 is larger than the number of embeddings \(4\)"):
        kmeans.cluster(np.ones((4, 3)), 9)
    with pytest.raises(MLCDError, match=r"\[n, d\] array"):
        kmeans.cluster(np.ones(5), 2)


def test_cli_is_the_function(mixture, tmp_path, capsys):
    """``mlcd cluster`` and ``mlcd assign`` write what the functions write, and an error of the
    function is the command's one-line status 2."""
    from mlcd_train.cli import main as cli

    root, _, _ = mixture
    kmeans.cluster_folder(str(root), 8, str(tmp_path / "f_cl"), seed=1, threads=1)
    assert cli(["cluster", "--emb", str(root), "--k", "8", "--out", str(tmp_path / "c_cl"), "--seed", "1",
                "--threads", "1"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "f_cl" / "centroids.npy"),
                                  np.load(tmp_path / "c_cl" / "centroids.npy"))
    res = assign.assign(str(root), str(tmp_path / "f_cl" / "centroids.npy"), str(tmp_path / "f_lbl"), topk=3,
                        threads=1)
    assert isinstance(res, assign.AssignResult) and res.total == 1200 and res.topk == 3 and res.k == 8
    assert res.meta["complete"] and res.stats is not None
    assert cli(["assign", "--emb", str(root), "--centroids", str(tmp_path / "c_cl" / "centroids.npy"),
                "--topk", "3", "--out", str(tmp_path / "c_lbl"), "--threads", "1"]) == 0
    for name in store.open_emb(str(root)).meta["counts"]:
        np.testing.assert_array_equal(np.load(tmp_path / "f_lbl" / f"{name}.labels.npy"),
                                      np.load(tmp_path / "c_lbl" / f"{name}.labels.npy"))
    capsys.readouterr()
    assert cli(["cluster", "--emb", str(root), "--k", "5000", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlcd cluster: error: ") and "k=5000 is larger" in err[0]


def test_embed_function_and_moved_pca_folder(tmp_path):
    """embed() returns its result; EMB/meta.json records the pca projection relative to the
    folder, so a moved folder resumes, and a meta of the old kind (absolute path) is still read."""
    shards = make_random_shards(tmp_path / "sh", n=32, size=16, num_classes=4, shard_size=16)
    out = tmp_path / "a" / "emb"
    res = embed.embed(str(shards), str(out), "pca", dim=4, image_size=8, workers=0, batch_size=8)
    assert isinstance(res, embed.EmbedResult) and res.dim == 4 and res.counts == {"shard-000000": 16,
                                                                                   "shard-000001": 16}
    meta = json.load(open(out / "meta.json"))
    assert meta["embedder_info"]["projection"] == "pca.npz"
    moved = tmp_path / "b" / "emb"
    shutil.move(str(out), str(moved))
    os.unlink(moved / "shard-000001.keys.npy")  # as if killed before the last shard
    again = embed.embed(str(shards), str(moved), "pca", dim=4, image_size=8, workers=0, batch_size=8)
    assert again.shards_done == 1 and store.open_emb(str(moved)).total == 32
    # a meta written before: the projection by its absolute path (here: where the folder was)
    meta = json.load(open(moved / "meta.json"))
    meta["embedder_info"]["projection"] = str(out / "pca.npz")
    (moved / "meta.json").write_text(json.dumps(meta))
    os.unlink(moved / "shard-000000.keys.npy")
    assert embed.embed(str(shards), str(moved), "pca", dim=4, image_size=8, workers=0,
                       batch_size=8).shards_done == 1
    # another projection under the same spec is still refused: the content decides
    other = tmp_path / "other"
    embed.embed(str(shards), str(other), "pca", dim=4, image_size=4, workers=0, batch_size=8)
    shutil.copy(other / "pca.npz", moved / "pca.npz")
    with pytest.raises(MLCDError, match="another model under the same spec|holds a dim-4 projection"):
        embed.embed(str(shards), str(moved), "pca", dim=4, image_size=4, workers=0, batch_size=8)


def test_embedder_registry():
    kinds = [k.name for k in embedder_kinds()]
    assert kinds == ["pca", "open_clip", "hf", "mlcd"]  # mlcd: registered by mlcd_train (imported above)

    class Const:
        spec, dim, needs_fit = "const", 2, False

        def __init__(self, arg, **opts):
            self.arg, self.opts = arg, opts

    register_embedder("const_test", lambda arg, **opts: Const(arg, **opts), usage="const_test:X",
                      missing_arg="const_test needs X")
    try:
        e = get_embedder("const_test:7", device="cpu", dim=None)
        assert isinstance(e, Const) and e.arg == "7" and e.opts == {"device": "cpu"}
        with pytest.raises(MLCDError, match="const_test needs X"):
            get_embedder("const_test")
    finally:
        from clustering.embedders import _KINDS

        _KINDS.pop("const_test")
    from clustering.embedders import spec_path

    assert [spec_path(s) for s in ("hf:/m", "mlcd:run", "pca:p.npz", "pca", "open_clip:ViT-B-32", "x:y")] == \
        ["/m", "run", "p.npz", None, None, None]
    with pytest.raises(MLCDError, match=r"unknown embedder .nope:1.: use one of pca, open_clip:NAME, hf:PATH, "
                                        r"mlcd:PATH"):
        get_embedder("nope:1")


def test_loss_registry_drives_config_and_partial_fc():
    from mlcd_train import config as C
    from mlcd_train.losses import LOSSES, loss_names, register_loss
    from mlcd_train.partial_fc import PartialFC

    assert C.LOSS_NAMES == loss_names() and set(loss_names()) == {"mlcd", "mlc", "unicom"}
    assert LOSSES["unicom"].single_positive and not LOSSES["mlcd"].single_positive
    # a new loss: one function, one registration; PartialFC computes it, and it is not mlcd
    register_loss("half_mlcd", lambda pos, neg: 0.5 * (LOSSES["mlcd"].per_sample(pos, neg)))
    try:
        torch.manual_seed(0)
        emb, labels = torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 10, (6, 2))
        full = PartialFC(8, 10, sample_rate=1.0, loss="mlcd", dtype=torch.float64)
        half = PartialFC(8, 10, sample_rate=1.0, loss="half_mlcd", dtype=torch.float64)
        half.load_state_dict(full.state_dict())
        torch.testing.assert_close(half(emb, labels), 0.5 * full(emb, labels))
        base = ["output_dir=/tmp/x", "data.synthetic=true", "loss.num_classes=10", "train.steps=5",
                "train.global_batch_size=8"]
        assert C.validate(C.build_config(None, base + ["loss.name=half_mlcd", "loss.l=2"])).loss.name == "half_mlcd"
    finally:
        LOSSES.pop("half_mlcd")
    with pytest.raises(MLCDError, match="is not one of"):
        PartialFC(8, 10, loss="half_mlcd")
    with pytest.raises(MLCDError, match="loss.name.*must be one of mlcd, unicom, mlc"):
        C.validate(C.build_config(None, base + ["loss.name=half_mlcd"]))
    with pytest.raises(MLCDError, match="the unicom loss uses one positive per image"):
        C.validate(C.build_config(None, base + ["loss.name=unicom", "loss.l=2"]))


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the sample through shards, embed, cluster, assign and the probe: ~1 min idle
def test_readme_from_python_block_runs(tmp_path, monkeypatch, capsys):
    """The README's "From Python" example, run as written (in a folder of its own)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## From Python"):]
    section = section[:section.index("\n## ", 5)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLCD_QUIET", "1")
    exec(compile(blocks[0], "README.md (From Python)", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("3000 images, ") and out[1] == "(16, 32)"
    linear = float(re.match(r"linear probe ([\d.]+)%", out[2]).group(1))
    assert 60 < linear < 100  # pca features of Fashion-MNIST: well above chance (10 %)
    assert (tmp_path / "py" / "labels" / "meta.json").is_file()
