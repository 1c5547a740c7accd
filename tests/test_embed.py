"""mlcd embed: pca and a tiny random open_clip tower, hf and mlcd embedders, resume, bad input."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from clustering import embed, store
from clustering.embedders import get_embedder
from mlcd_train.data.reader import ShardDataset
from mlcd_train.utils.errors import MLCDError
from tests.fixtures import make_random_shards

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_random_shards(tmp_path_factory.mktemp("sh"), n=48, size=32, num_classes=4, shard_size=16)


def _samples(shard_dir, transform):
    return list(ShardDataset(shard_dir, transform=transform, rank=0, world_size=1))


def _check_against(emb_dir, shard_dir, embedder, atol=2e-3):
    """Stored rows == the embedder applied sample by sample, normalised; keys and classes aligned."""
    samples = _samples(shard_dir, embedder.transform)
    for name in {s.shard for s in samples}:
        mine = sorted((s for s in samples if s.shard == name), key=lambda s: s.index)
        want = store.normalise(embedder(torch.stack([s.image for s in mine])).numpy())
        got = np.load(os.path.join(emb_dir, f"{name}.npy"))
        assert got.dtype == np.float16 and got.shape == want.shape
        np.testing.assert_allclose(got.astype(np.float32), want, atol=atol)
        assert np.load(os.path.join(emb_dir, f"{name}.keys.npy")).tolist() == [s.key for s in mine]
        assert np.load(os.path.join(emb_dir, f"{name}.cls.npy")).tolist() == [s.cls for s in mine]


def test_embed_pca_and_reload_projection(shards, tmp_path):
    out = tmp_path / "emb"
    assert embed.main(["--shards", str(shards), "--out", str(out), "--model", "pca", "--dim", "6",
                       "--image-size", "8", "--workers", "0", "--batch-size", "10"]) == 0
    meta = json.load(open(out / "meta.json"))
    assert meta["embedder"] == "pca" and meta["dim"] == 6 and meta["complete"]
    assert meta["counts"] == {"shard-000000": 16, "shard-000001": 16, "shard-000002": 16}
    reloaded = get_embedder(f"pca:{out / 'pca.npz'}")
    assert reloaded.dim == 6 and reloaded.image_size == 8
    _check_against(out, shards, reloaded)
    # the projection whitens its fit sample: unit variance along each kept direction
    x = torch.stack([s.image for s in _samples(shards, reloaded.transform)])
    z = reloaded(x).numpy()
    np.testing.assert_allclose(z.var(axis=0, ddof=1), 1.0, rtol=1e-2)
    assert store.open_emb(out).total == 48


def test_embed_tiny_open_clip_with_local_checkpoint(shards, tmp_path):
    import open_clip

    cfg = tmp_path / "tiny-clip.json"
    cfg.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(str(cfg))
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip")
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "emb"
    assert embed.main(["--shards", str(shards), "--out", str(out), "--model", f"open_clip:{cfg}",
                       "--pretrained", str(ckpt), "--workers", "2", "--batch-size", "7"]) == 0
    e = get_embedder(f"open_clip:{cfg}", pretrained=str(ckpt), device="cpu")
    assert e.dim == 16
    # the loaded checkpoint is the one given (not a fresh random init)
    x = torch.stack([s.image for s in _samples(shards, e.transform)[:4]])
    with torch.no_grad():
        np.testing.assert_allclose(e(x).numpy(), model.encode_image(x).numpy(), atol=1e-5)
    _check_against(out, shards, e)
    meta = json.load(open(out / "meta.json"))
    assert meta["embedder"] == f"open_clip:{cfg}" and meta["embedder_info"]["pretrained"] == str(ckpt)


def test_hf_and_mlcd_embedders(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from mlcd_train.export import save_native
    from mlcd_train.models import create_model
    from mlcd_train.models.registry import model_config_to_dict

    torch.manual_seed(0)
    hf = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=32, patch_size=8)).eval()
    hf.save_pretrained(tmp_path / "hf")
    e = get_embedder(f"hf:{tmp_path / 'hf'}", device="cpu")
    x = torch.randn(3, 3, 32, 32)
    assert e.dim == 32
    with torch.no_grad():
        np.testing.assert_allclose(e(x).numpy(), hf(pixel_values=x).pooler_output.numpy(), atol=1e-5)

    m = create_model("ViT-Tiny-4-32").eval()
    save_native(m.state_dict(), model_config_to_dict(m), tmp_path / "tiny.pt")
    e = get_embedder(f"mlcd:{tmp_path / 'tiny.pt'}", device="cpu")
    assert e.dim == (m.config.output_dim or m.config.width)
    with torch.no_grad():
        np.testing.assert_allclose(e(x).numpy(), m(x).numpy(), atol=1e-5)


def test_resume_after_crash_skips_finished_shards(shards, tmp_path, monkeypatch):
    out = tmp_path / "emb"
    args = ["--shards", str(shards), "--out", str(out), "--model", "pca", "--dim", "4", "--image-size", "8",
            "--workers", "1"]
    assert embed.main(args) == 0
    # crash while shard 2 was being written: its keys (written last) never landed, and the
    # temporary file of its embeddings is left behind
    os.unlink(out / "shard-000002.keys.npy")
    (out / f".shard-000002.npy.{os.getpid()}.tmp").write_bytes(b"half")
    groups = []
    real = embed.embed_group
    monkeypatch.setattr(embed, "embed_group", lambda e, g, *a, **k: groups.append(list(g)) or real(e, g, *a, **k))
    keep = {n: os.stat(out / n).st_mtime_ns for n in ("shard-000000.npy", "shard-000001.npy", "pca.npz")}
    assert embed.main(args) == 0
    assert [[os.path.basename(s) for s in g] for g in groups] == [["shard-000002.tar"]]
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    assert {n: os.stat(out / n).st_mtime_ns for n in keep} == keep
    assert json.load(open(out / "meta.json"))["complete"]
    assert store.open_emb(out).total == 48


def test_other_embedder_refused_nothing_damaged(shards, tmp_path):
    out = tmp_path / "emb"
    base = ["--shards", str(shards), "--out", str(out), "--workers", "0"]
    assert embed.main(base + ["--model", "pca", "--dim", "4", "--image-size", "8"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    cfg = tmp_path / "tiny-clip2.json"
    cfg.write_text(json.dumps(TINY_OPEN_CLIP))
    with pytest.raises(MLCDError, match=r"meta\.json: .* holds embeddings of 'pca' \(dim 4\), not 'open_clip:"):
        embed.main(base + ["--model", f"open_clip:{cfg}"])
    with pytest.raises(MLCDError, match=r"pca\.npz: holds a dim-4 projection, --dim 5 was asked"):
        embed.main(base + ["--model", "pca", "--dim", "5", "--image-size", "8"])
    with pytest.raises(MLCDError, match=r"nope\.npz: pca projection file not found"):
        embed.main(base + ["--model", f"pca:{tmp_path / 'nope.npz'}"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _dist_embed_assign(rank, world, shard_dir, out, cpath):
    from clustering import assign

    embed.main(["--shards", shard_dir, "--out", out + "/emb", "--model", "pca", "--dim", "4", "--image-size", "8",
                "--workers", "0"])
    assign.main(["--emb", out + "/emb", "--centroids", cpath, "--topk", "2", "--out", out + "/lbl"])
    return sorted(os.listdir(out + "/emb"))


def _assert_same_arrays(a, b):
    """Same arrays up to float rounding: a reduction (the pca fit, a matmul) may sum in another
    order in another process (memory alignment, thread count), so floats are compared with
    a tolerance and everything else exactly; a label may only differ where two scores tie."""
    za, zb = np.load(a, allow_pickle=False), np.load(b, allow_pickle=False)
    if a.suffix == ".npz":
        assert sorted(za.files) == sorted(zb.files), a.name
        for k in za.files:
            np.testing.assert_allclose(za[k], zb[k], rtol=1e-6, atol=1e-9, err_msg=f"{a.name}:{k}")
        return
    assert za.shape == zb.shape and za.dtype == zb.dtype, a.name
    if a.name.endswith(".labels.npy"):
        scores = np.load(str(a).replace(".labels.npy", ".scores.npy")).astype(np.float32)
        differ = (za != zb).any(1)
        assert differ.mean() <= 0.01, a.name
        gaps = np.abs(np.diff(scores[differ], axis=1))
        assert (gaps.min(1, initial=1.0) < 2e-3).all() if differ.any() else True, a.name
    elif za.dtype.kind == "f":
        np.testing.assert_allclose(za.astype(np.float32), zb.astype(np.float32), atol=2e-3, err_msg=a.name)
    else:
        assert (za == zb).all(), a.name


@pytest.mark.slow
def test_two_ranks_split_shards_and_match_one_process(shards, tmp_path):
    """embed + assign on 2 gloo ranks (shards split over ranks) == the single-process run."""
    from clustering import assign
    from tests.dist_utils import run_distributed

    one = tmp_path / "one"
    assert embed.main(["--shards", str(shards), "--out", str(one / "emb"), "--model", "pca", "--dim", "4",
                       "--image-size", "8", "--workers", "0"]) == 0
    cpath = tmp_path / "c.npy"
    np.save(cpath, store.normalise(np.random.default_rng(0).normal(size=(5, 4))).astype(np.float32))
    assert assign.main(["--emb", str(one / "emb"), "--centroids", str(cpath), "--topk", "2",
                        "--out", str(one / "lbl")]) == 0
    two = tmp_path / "two"
    run_distributed(_dist_embed_assign, 2, (str(shards), str(two), str(cpath)))
    for sub in ("emb", "lbl"):
        names = sorted(p.name for p in (one / sub).iterdir() if p.suffix == ".npy" or p.name.endswith(".npz"))
        assert names == sorted(p.name for p in (two / sub).iterdir() if p.suffix == ".npy" or p.name.endswith(".npz"))
        for n in names:
            _assert_same_arrays(one / sub / n, two / sub / n)
    m1, m2 = (json.load(open(d / "emb" / "meta.json")) for d in (one, two))
    assert m1["counts"] == m2["counts"] and m2["world_size"] == 2
    s1, s2 = (json.load(open(d / "lbl" / "stats.json")) for d in (one, two))
    assert s1.keys() == s2.keys()
    for k in s1:
        if isinstance(s1[k], float):
            assert s1[k] == pytest.approx(s2[k], abs=2e-3), k
        else:
            assert s1[k] == s2[k], k


def test_overwrite_killed_then_rerun_gives_one_model(shards, tmp_path, monkeypatch):
    """--overwrite with another projection, killed after its first shard: no old shard may count
    as finished, so the plain rerun embeds the rest with the new projection (not a mix)."""
    out = tmp_path / "emb"
    base = ["--shards", str(shards), "--out", str(out), "--model", "pca", "--workers", "1"]
    assert embed.main(base + ["--dim", "4", "--image-size", "8"]) == 0
    real, calls = store.write_shard, []

    def killed_on_second(*a, **k):
        calls.append(a[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(store, "write_shard", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        embed.main(base + ["--dim", "4", "--image-size", "12", "--overwrite"])
    monkeypatch.undo()
    assert [n for n in ("shard-000001", "shard-000002") if store.shard_done(out, n)] == []
    assert embed.main(base + ["--dim", "4", "--image-size", "12"]) == 0
    _check_against(out, shards, get_embedder(f"pca:{out / 'pca.npz'}"))


def test_same_spec_other_weights_refused(shards, tmp_path):
    """The spec names the architecture only: a resume with another --pretrained file is refused."""
    import open_clip

    cfg = tmp_path / "tiny-clip3.json"
    cfg.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(str(cfg))
    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        ckpts.append(tmp_path / f"w{seed}.pt")
        torch.save(open_clip.create_model("tiny-clip3").state_dict(), ckpts[-1])
    out = tmp_path / "emb"
    base = ["--shards", str(shards), "--out", str(out), "--model", f"open_clip:{cfg}", "--workers", "0"]
    assert embed.main(base + ["--pretrained", str(ckpts[0])]) == 0
    os.unlink(out / "shard-000002.keys.npy")  # as if killed before the last shard
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(MLCDError, match=r"emb/meta\.json: .* another model under the same spec .*differs in "
                                        r"pretrained, weights_sha"):
        embed.main(base + ["--pretrained", str(ckpts[1])])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert embed.main(base + ["--pretrained", str(ckpts[0])]) == 0  # the same weights resume


def test_duplicate_shard_names_refused(tmp_path):
    a = make_random_shards(tmp_path / "a", n=8, shard_size=8, seed=1)
    b = make_random_shards(tmp_path / "b", n=8, shard_size=8, seed=2)
    with pytest.raises(MLCDError, match=r"b/random_shards/shard-000000\.tar: shard name shard-000000 also names "):
        embed.main(["--shards", f"{tmp_path}/{{a,b}}/random_shards", "--out", str(tmp_path / "emb"),
                    "--model", "pca", "--dim", "4", "--image-size", "8", "--workers", "0"])
    assert a.exists() and b.exists() and not (tmp_path / "emb").exists()


def test_redone_shard_without_classes_drops_old_classes(tmp_path):
    x = np.eye(3, 4, dtype=np.float32)
    store.write_shard(tmp_path, "s", x, ["a", "b", "c"], np.array([0, 1, 2]))
    assert (tmp_path / "s.cls.npy").exists()
    store.write_shard(tmp_path, "s", x, ["a", "b", "c"])
    assert not (tmp_path / "s.cls.npy").exists()
