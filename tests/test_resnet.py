"""ResNet students (timm's ResNet): registry, training under 2 gloo ranks, export into timm's
own model with identical outputs, the ``mlcd:`` embedder, and drop path seeded."""
from __future__ import annotations

import json

import pytest
import torch

from mlcd_train import export, train
from mlcd_train.models import (config_from_dict, create_model, family_of, list_models, model_config_to_dict,
                               timm_resnet)
from mlcd_train.utils.errors import MLCDError
from tests.dist_utils import run_distributed

SMALL = [n for n in list_models("resnet") if n.endswith("-28")]


def test_registry_has_both_families():
    assert set(list_models("resnet")) >= {"resnet18", "resnet50", "ResNet-18-w16-28"}
    assert family_of("ViT-Tiny-4-28") == "vit" and family_of("resnet50") == "resnet"
    assert not set(list_models("resnet")) & set(list_models("vit"))
    with pytest.raises(MLCDError, match="patch_size"):        # a ViT override on a ResNet
        create_model("ResNet-10-w16-28", patch_size=4)
    with pytest.raises(MLCDError, match="drop_path"):
        create_model("ResNet-10-w16-28", drop_path=1.5)


@pytest.mark.parametrize("name,size", [("resnet18", 64), ("resnet50", 64)])
def test_imagenet_presets_are_timms_own_architectures(name, size):
    """An export of resnet18 / resnet50 loads into ``timm.create_model(name)`` strictly."""
    import timm

    torch.manual_seed(0)
    ours = create_model(name, output_dim=32).eval()
    theirs = timm.create_model(name, pretrained=False, num_classes=32).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def _train_two_steps(rank, world, out, name):
    return train.main([f"output_dir={out}", "data.synthetic=true", "loss.num_classes=40", "loss.l=2",
                     f"model.name={name}", "model.drop_path=0.1", "train.steps=2", "train.global_batch_size=4",
                     "train.save_every=2", "train.log_every=1", "loss.sample_rate=0.5", "optim.warmup_steps=1",
                     "train.device=cpu", "seed=1"])


@pytest.mark.slow  # two spawned ranks: ~20 s of CPU per preset (make test-fast leaves it out)
@pytest.mark.parametrize("name", SMALL)
def test_small_preset_trains_two_steps_on_two_ranks_and_exports_into_timm(name, tmp_path):
    out = tmp_path / "run"
    assert run_distributed(_train_two_steps, 2, args=(str(out), name), timeout=240) == [0, 0]
    pt = tmp_path / "student.pt"
    assert export.main(["--checkpoint", str(out), "--out", str(pt)]) == 0
    side = json.loads(pt.with_suffix(".json").read_text())
    cfg = side["model_config"]
    assert cfg["family"] == "resnet" and cfg["name"] == name and cfg["drop_path"] == 0.1
    sd = torch.load(pt, weights_only=True)
    plain = timm_resnet(cfg)                          # timm.models.resnet.ResNet, stem swapped as documented
    assert type(plain).__module__ == "timm.models.resnet"
    plain.load_state_dict(sd, strict=True)
    ours = export.load_model(pt)
    plain.eval()
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(ours(x), plain(x))
    # the trained weights, not an initialisation: they differ from a fresh model's
    fresh = create_model(name)
    assert any(not torch.equal(v, fresh.state_dict()[k]) for k, v in sd.items() if v.is_floating_point())


def test_plain_timm_resnet_by_hand_from_the_sidecar(tmp_path):
    """The README's recipe without mlcd: timm's ResNet(**timm_kwargs) plus the CIFAR stem swap."""
    from timm.models import resnet as tr
    from torch import nn

    model = create_model("ResNet-10-w16-28", output_dim=24).eval()
    cfg = model_config_to_dict(model)
    kw = dict(cfg["timm_kwargs"])
    kw["block"] = getattr(tr, kw["block"])
    kw["layers"], kw["channels"] = tuple(kw["layers"]), tuple(kw["channels"])
    plain = tr.ResNet(**kw)
    plain.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    plain.maxpool = nn.Identity()
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    assert config_from_dict(json.loads(json.dumps(cfg))).output_dim == 24


def test_mlcd_embedder_reads_a_resnet_export(tmp_path):
    from clustering.embedders import get_embedder
    from mlcd_train.export import save_native

    model = create_model("ResNet-10-w16-28").eval()
    pt = tmp_path / "r.pt"
    save_native(model.state_dict(), model_config_to_dict(model), pt)
    emb = get_embedder(f"mlcd:{pt}", device="cpu")
    assert emb.dim == model.embed_dim == 128
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.allclose(emb(x), model(x))


def test_resnet_export_without_its_sidecar_is_refused_by_name(tmp_path):
    model = create_model("ResNet-10-w16-28")
    pt = tmp_path / "bare.pt"
    torch.save(model.state_dict(), pt)
    with pytest.raises(MLCDError, match="ResNet state dict.*sidecar"):
        export.load_model(pt)


@pytest.mark.parametrize("name,over", [("ResNet-10-w16-28", {}),
                                       ("ViT-Tiny-4-28", {"layers": 3, "width": 32, "heads": 2})])
def test_drop_path_is_seeded_and_active(name, over):
    torch.manual_seed(0)
    model = create_model(name, drop_path=0.5, **over).train()
    with torch.no_grad():  # timm zero-initialises each residual branch's last norm: dropping it would be a no-op
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(8, 3, 28, 28)

    def run(seed):
        torch.manual_seed(seed)
        return model(x)

    assert torch.equal(run(1), run(1))               # same seed, same branches dropped
    assert not torch.equal(run(1), run(2))           # another seed, others
    model.eval()
    assert torch.equal(model(x), model(x))           # no dropping at evaluation
    plain = create_model(name, **over)
    plain.load_state_dict(model.state_dict())
    plain.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))


def test_resnet_export_is_refused_by_convert_and_grad_checkpointing_by_name(tmp_path):
    from mlcd_train import convert
    from mlcd_train.export import save_native

    model = create_model("ResNet-10-w16-28")
    pt = tmp_path / "r.pt"
    save_native(model.state_dict(), model_config_to_dict(model), pt)
    with pytest.raises(MLCDError, match="resnet export; the Hugging Face conversion is for ViTs"):
        convert.convert_to_hf(pt, tmp_path / "hf")
    with pytest.raises(MLCDError, match="model.grad_checkpointing"):
        train.main([f"output_dir={tmp_path / 'run'}", "data.synthetic=true", "loss.num_classes=8", "loss.l=2",
                    "model.name=ResNet-10-w16-28", "model.grad_checkpointing=true", "train.steps=1",
                    "train.global_batch_size=4", "train.device=cpu"])
