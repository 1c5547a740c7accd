"""Adding an embedder is one class and one registration: a kind fitted on the corpus, defined
here, runs through `mlcd embed` / embed() and `mlcd probe` / probe() with its own option,
state file and resume check, and neither stage names a kind (their code goes through the
registry)."""
from __future__ import annotations

import ast
import io
import json
import os
import tokenize
from pathlib import Path

import numpy as np
import pytest
import torch

from clustering import embed, store
from clustering.embedders import (Embedder, EmbedderOption, fitted_spec, get_embedder, register_embedder,
                                  spec_reads, unregister_embedder)
from mlcd_core.errors import MLCDError
from mlcd_train import probe
from tests.fixtures import make_random_shards

ROOT = Path(__file__).resolve().parents[1]
FITS: list[int] = []  # images each fit was given


class _Pixels:
    """PIL -> [3, 4, 4] float tensor in [0, 1] (picklable, for DataLoader workers)."""

    def __call__(self, img):
        from mlcd_core.reader import to_rgb8

        a = np.asarray(to_rgb8(img).resize((4, 4)), dtype=np.float32) / 255.0
        return torch.from_numpy(a).permute(2, 0, 1).contiguous()


class MeanPix(Embedder):
    """Pixels minus the mean image of the fit sample, times ``mp_scale``: fitted on the corpus."""

    state_key = "state"

    def __init__(self, state=None, mp_scale=1.0, fit_count=5, device=None, **_):
        super().__init__(device="cpu", autocast=False)
        self.scale, self.fit_samples, self.dim, self.spec = float(mp_scale), int(fit_count), 48, "meanpix"
        self.mean, self.state, self.transform = None, None, _Pixels()
        if state:
            self.load(state)

    @property
    def needs_fit(self):
        return self.mean is None

    def fit(self, batches):
        x = torch.cat(list(batches))
        FITS.append(len(x))
        self.mean = x.mean(0)
        return self

    def save(self, path):
        from mlcd_core.io import atomic_open

        with atomic_open(path, "wb") as f:
            np.savez(f, mean=self.mean.numpy(), scale=np.float64(self.scale))
        self.state = os.path.abspath(path)

    def load(self, path):
        z = np.load(path, allow_pickle=False)
        self.mean, self.scale, self.state = torch.from_numpy(z["mean"]), float(z["scale"]), os.path.abspath(path)

    def resume(self, path):
        asked = self.scale
        self.load(path)
        if self.scale != asked:
            raise MLCDError(f"{path}: fitted with --mp-scale {self.scale:g}, {asked:g} was asked")

    def forward(self, pixels):
        return ((pixels - self.mean) * self.scale).reshape(len(pixels), -1) + 1.0  # never a zero row

    @property
    def weights_path(self):
        return self.state

    def describe(self):
        return {"spec": self.spec, "dim": self.dim, "scale": self.scale, "state": self.state}


MP_SCALE = EmbedderOption("mp_scale", "--mp-scale", float, 1.0, "meanpix: scale", probe_flag="--mp-scale")
FIT_COUNT = EmbedderOption("fit_count", "--fit-count", int, 5, "meanpix: images fitted on")


@pytest.fixture
def meanpix():
    """The one registration the new kind needs (removed again after the test)."""
    register_embedder("meanpix", lambda arg, **opts: MeanPix(arg or None, **opts), usage="meanpix",
                      arg_is_path=True, options=(MP_SCALE, FIT_COUNT), state_file="meanpix.npz",
                      forms="meanpix | meanpix:FILE.npz")
    FITS.clear()
    yield
    unregister_embedder("meanpix")


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reg")
    return (make_random_shards(tmp, n=24, size=8, num_classes=3, shard_size=8, seed=0, name="train"),
            make_random_shards(tmp, n=12, size=8, num_classes=3, shard_size=6, seed=1, name="test"))


def _rows(folder) -> np.ndarray:
    f = store.open_emb(str(folder))
    return np.concatenate([store.read_rows(sh, 0, sh.n) for sh in f.shards])


def test_new_fitted_kind_through_embed(meanpix, splits, tmp_path, monkeypatch):
    train, _ = splits
    out = tmp_path / "emb"
    argv = ["--shards", str(train), "--out", str(out), "--model", "meanpix", "--mp-scale", "2", "--fit-count", "7",
            "--workers", "0", "--batch-size", "5"]
    assert embed.main(argv) == 0  # its flags come from its registration
    assert FITS == [7]  # fitted on exactly fit_count images, once
    meta = json.loads((out / "meta.json").read_text())
    assert meta["embedder"] == "meanpix" and meta["dim"] == 48 and meta["complete"]
    assert meta["embedder_info"]["scale"] == 2.0 and meta["embedder_info"]["state"] == "meanpix.npz"  # relative
    # the rows are the fitted embedder's, reloaded from the state file by the kind's spec form
    again = get_embedder(f"meanpix:{out / 'meanpix.npz'}")
    from mlcd_core.reader import ShardDataset

    samples = sorted(ShardDataset(str(train), transform=again.transform, rank=0, world_size=1),
                     key=lambda s: (s.shard, s.index))
    want = store.normalise(again(torch.stack([s.image for s in samples])).numpy())
    np.testing.assert_allclose(_rows(out).astype(np.float32), want, atol=2e-3)
    # a rerun resumes the state file (no refit), one asking another scale is refused by the kind
    os.unlink(out / "shard-000002.keys.npy")
    mtime = os.stat(out / "meanpix.npz").st_mtime_ns
    assert embed.embed(str(train), str(out), "meanpix", mp_scale=2.0, fit_count=7, workers=0).shards_done == 1
    assert FITS == [7] and os.stat(out / "meanpix.npz").st_mtime_ns == mtime
    with pytest.raises(MLCDError, match=r"meanpix\.npz: fitted with --mp-scale 2, 3 was asked"):
        embed.embed(str(train), str(out), "meanpix", mp_scale=3.0, workers=0)
    # --overwrite refits; an option no kind declares is a TypeError, as for any function
    assert embed.embed(str(train), str(out), "meanpix", mp_scale=3.0, workers=0, overwrite=True).shards_done == 3
    assert FITS == [7, 5]
    with pytest.raises(TypeError, match="unexpected keyword argument 'mp_scal'"):
        embed.embed(str(train), str(out), "meanpix", mp_scal=3.0)


def test_new_fitted_kind_through_probe(meanpix, splits, tmp_path):
    train, test = splits
    out = tmp_path / "probe"
    assert probe.main(["--embedder", "meanpix", "--train", str(train), "--test", str(test), "--out", str(out),
                       "--mp-scale", "2", "--workers", "0", "--l2-grid", "0.01", "--knn-k", "3"]) == 0
    assert FITS == [5]  # the training split only
    fdir = out / "features" / probe.embedder_slug("meanpix")
    # the test split is embedded with the state fitted on the training split: the kind's spec form
    test_meta = json.loads((fdir / "emb_test" / "meta.json").read_text())
    assert test_meta["embedder"] == "meanpix" and not (fdir / "emb_test" / "meanpix.npz").exists()
    assert test_meta["embedder_info"]["state"] == str(fdir / "emb_train" / "meanpix.npz")
    assert test_meta["embedder_info"]["scale"] == 2.0  # the option reached the embedder
    info = json.loads((fdir / "embedder.json").read_text())
    assert info["test"]["fitted_on"] == info["train"]
    res = probe.probe("meanpix", str(train), str(test), str(out), mp_scale=2.0, workers=0, l2_grid=[0.01], knn_k=3)
    assert res.record["dim"] == 48 and FITS == [5]  # cached: no second fit
    with pytest.raises(TypeError, match="unexpected keyword argument 'fit_count'"):  # not offered to the probe
        probe.probe("meanpix", str(train), str(test), str(out), fit_count=3)


def test_registry_hooks(meanpix, tmp_path):
    assert fitted_spec("meanpix", "E") == "meanpix:" + os.path.join("E", "meanpix.npz")
    assert fitted_spec("meanpix:x.npz", "E") is None and fitted_spec("hf:/m", "E") is None
    assert fitted_spec("pca", "E") == "pca:" + os.path.join("E", "pca.npz")
    (tmp_path / "w.pt").write_bytes(b"")
    assert spec_reads("open_clip:ViT-B-32", {"pretrained": str(tmp_path / "w.pt")}) == [
        ("pretrained", str(tmp_path / "w.pt"))]
    assert spec_reads("open_clip:c.json", {"pretrained": "laion2b"}) == [(None, "c.json")]
    assert spec_reads("meanpix:s.npz", {}) == [(None, "s.npz")] and spec_reads("nope:x", {}) == []
    # an option name may serve several kinds only as one declaration
    with pytest.raises(ValueError, match="option 'mp_scale'"):
        register_embedder("other", MeanPix, usage="other",
                          options=(EmbedderOption("mp_scale", "--mp-scale", int, 0, "another"),))
    assert "--mp-scale" in embed.build_parser().format_help() and "--mp-scale" in probe.build_parser().format_help()
    assert "--fit-count" not in probe.build_parser().format_help()


def _code_words(path: Path) -> list[tuple[int, str]]:
    """Every identifier, string and comment of a module except its docstrings."""
    tree = ast.parse(path.read_text())
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                    first.value.value, str):
                docs.add(first.lineno)
    words = []
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type in (tokenize.NAME, tokenize.STRING, tokenize.COMMENT) and not (
                tok.type == tokenize.STRING and tok.start[0] in docs):
            words.append((tok.start[0], tok.string))
    return words


def _kind_names(path: Path) -> list[tuple[int, str]]:
    return [(line, w) for line, w in _code_words(path)
            if any(kind in w.lower() for kind in ("pca", "open_clip", "openclip", "hf:", "mlcd:"))]


@pytest.mark.parametrize("module", ["clustering/embed.py", "mlcd_train/probe.py"])
def test_stages_name_no_embedder_kind(module, tmp_path):
    """embed and the probe know kinds only through the registry: no kind's name in their code
    (identifiers, strings, comments; docstrings may give examples)."""
    assert _kind_names(ROOT / module) == []
    # the scan finds a branch on a kind, and skips only docstrings
    (tmp_path / "m.py").write_text('"""pca docs."""\ndef f(model):\n    """open_clip."""\n'
                                   '    return model == "pca"  # fit_pca\n')
    assert _kind_names(tmp_path / "m.py") == [(4, '"pca"'), (4, "# fit_pca")]
