"""init.checkpoint: a fresh run whose backbone starts from another run or an export (the
paper's one epoch at 336 px after 224 px), with its own fresh Partial FC, optimiser and step 0."""
from __future__ import annotations

import types

import pytest
import torch

from mlcd_train import config as C
from mlcd_train import train
from mlcd_train.trainer.checkpoint import list_checkpoints
from mlcd_train.trainer.init import resize_pos_embed
from mlcd_train.utils.dist import DistInfo
from mlcd_train.utils.errors import MLCDError

VIT = "{patch_size: 7, width: 32, layers: 2, heads: 2, output_dim: 16, image_size: %d}"


def _args(out, *extra, size=28, model="ViT-Tiny-4-28", overrides=None):
    return [f"output_dir={out}", "data.synthetic=true", "loss.num_classes=40", "loss.l=2", "loss.sample_rate=0.5",
            f"model.name={model}", f"model.overrides={overrides or VIT % size}", "train.global_batch_size=4",
            "train.log_every=1", "optim.warmup_steps=0", "optim.lr=1e-2", "seed=5", *extra]


def _trainer(argv) -> train.Trainer:
    """A Trainer set up (model, Partial FC, optimisers, resume / init) without training."""
    t = train.Trainer(C.build_config(None, argv), DistInfo())
    t.start = t.setup()
    return t


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("init") / "src28"
    assert train.main(_args(out, "train.steps=3")) == 0  # trained: its weights differ from any fresh init
    return out


def test_resize_pos_embed_matches_open_clip():
    open_clip_model = pytest.importorskip("open_clip.model")
    pos = torch.randn(1 + 4 * 4, 8)
    for grid in (6, 3, 4):
        sd = {"visual.positional_embedding": pos.clone()}
        fake = types.SimpleNamespace(visual=types.SimpleNamespace(grid_size=(grid, grid)))
        open_clip_model.resize_pos_embed(sd, fake)
        ours = resize_pos_embed(pos, grid)
        assert ours.shape == (1 + grid * grid, 8)
        torch.testing.assert_close(ours, sd["visual.positional_embedding"], rtol=0, atol=1e-6)
        assert torch.equal(ours[0], pos[0])                       # the class row as it was


def test_resize_pos_embed_keeps_a_constant_grid_constant():
    pos = torch.cat([torch.zeros(1, 3), torch.full((25, 3), 0.7)])
    out = resize_pos_embed(pos, 8)
    torch.testing.assert_close(out[1:], torch.full((64, 3), 0.7))


def test_42px_run_from_a_28px_run(source, tmp_path, capsys):
    src_sd = torch.load(list_checkpoints(source / "checkpoints")[-1][1] / "model.pt", weights_only=True)["state_dict"]
    t = _trainer(_args(tmp_path / "r42", "train.steps=2", f"init.checkpoint={source}", size=42))
    assert t.start == 0 and "backbone initialised from" in capsys.readouterr().err
    own = t.core.state_dict()
    pos = own["positional_embedding"]
    assert pos.shape == (1 + 6 * 6, 32) and src_sd["positional_embedding"].shape == (1 + 4 * 4, 32)
    assert torch.equal(pos, resize_pos_embed(src_sd["positional_embedding"], 6))
    assert torch.equal(pos[0], src_sd["positional_embedding"][0])
    for key, value in own.items():
        if key != "positional_embedding":
            assert torch.equal(value, src_sd[key]), key                  # bit for bit
    fresh = _trainer(_args(tmp_path / "fresh42", "train.steps=2", size=42))
    assert torch.equal(t.pfc.weight, fresh.pfc.weight)                   # Partial FC: a fresh init, same seed
    assert not torch.equal(own["conv1.weight"], fresh.core.state_dict()["conv1.weight"])
    assert len(t.opt.state) == 0                                         # optimiser: nothing yet
    assert all(int(v.abs().sum()) == 0 for v in t.pfc_opt.state[t.pfc.weight].values())


def test_the_run_trains_and_resumes_from_its_own_checkpoint(source, tmp_path, capsys):
    out = tmp_path / "r42"
    assert train.main(_args(out, "train.steps=2", f"init.checkpoint={source}", size=42)) == 0
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2]
    capsys.readouterr()
    t = _trainer(_args(out, "train.steps=4", f"init.checkpoint={source}", size=42))
    err = capsys.readouterr().err
    assert t.start == 2 and "init.checkpoint" in err and "ignored" in err and "backbone initialised" not in err
    own = torch.load(out / "checkpoints" / "step_00000002" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, own[k]) for k, v in t.core.state_dict().items())


def test_a_tower_of_another_width_is_refused_by_name(source, tmp_path):
    wide = "{patch_size: 7, width: 48, layers: 2, heads: 2, output_dim: 16, image_size: 42}"
    with pytest.raises(MLCDError, match=r"'init.checkpoint'.*shape.*conv1\.weight \(32, 3, 7, 7\) vs \(48, 3, 7, 7\)"):
        _trainer(_args(tmp_path / "w", "train.steps=2", f"init.checkpoint={source}", overrides=wide))
    deeper = "{patch_size: 7, width: 32, layers: 3, heads: 2, output_dim: 16, image_size: 28}"
    with pytest.raises(MLCDError, match=r"missing \[transformer\.resblocks\.2\."):
        _trainer(_args(tmp_path / "d", "train.steps=2", f"init.checkpoint={source}", overrides=deeper))
    with pytest.raises(MLCDError, match=r"'init.checkpoint'.*no such file"):
        _trainer(_args(tmp_path / "n", "train.steps=2", f"init.checkpoint={tmp_path / 'nope.pt'}"))
    assert not (tmp_path / "w").exists()                                 # refused before writing anything


def test_resnet_run_from_a_resnet_export(tmp_path):
    from mlcd_train.export import export_checkpoint

    res = "{image_size: 28}"
    src = tmp_path / "res28"
    assert train.main(_args(src, "train.steps=2", model="ResNet-10-w16-28", overrides=res)) == 0
    export_checkpoint(src, tmp_path / "res.pt")
    exported = torch.load(tmp_path / "res.pt", weights_only=True)
    t = _trainer(_args(tmp_path / "res32", "train.steps=2", f"init.checkpoint={tmp_path / 'res.pt'}",
                       model="ResNet-10-w16-28", overrides="{image_size: 32}"))
    own = t.core.state_dict()
    assert t.core.config.image_size == 32 and set(own) == set(exported)
    assert all(torch.equal(v, exported[k]) for k, v in own.items())
    with pytest.raises(MLCDError, match=r"holds a resnet tower, this run trains a vit"):
        _trainer(_args(tmp_path / "v", "train.steps=2", f"init.checkpoint={tmp_path / 'res.pt'}"))
