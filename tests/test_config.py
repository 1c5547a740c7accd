"""Config system: presets, base chains, typed key=value overrides, validation naming the key."""
from __future__ import annotations

import pytest
import yaml

from mlcd_train import config as C
from mlcd_train.utils.errors import MLCDError

PRESETS = sorted(p.stem for p in C.CONFIGS_DIR.glob("*.yaml"))


def _ok(**over):
    cfg = C.build_config(None, ["output_dir=/tmp/x", "data.synthetic=true", "loss.num_classes=10",
                                "train.steps=5", "train.global_batch_size=8"] +
                         [f"{k}={v}" for k, v in over.items()])
    return cfg


def test_presets_exist_and_resolve():
    for name in ("vit_l14_paper", "vit_b32_paper", "vit_bigg14_rope2d", "fashion_mnist_sample",
                 "fashion_mnist_full", "fashion_mnist_tiny"):
        assert name in PRESETS
    from mlcd_train.models import list_models

    for name in PRESETS:
        cfg = C.build_config(name)
        assert cfg.model.name in list_models(), name
        # every preset is complete enough to validate once the label metadata is known
        C.validate(cfg, world_size=1 if cfg.train.global_batch_size % 8 else 8,
                   labels_meta={"k": cfg.loss.num_classes or 100, "topk": 8})


def test_paper_recipe_values():
    cfg = C.build_config("vit_l14_paper")
    assert (cfg.loss.num_classes, cfg.loss.l, cfg.loss.sample_rate, cfg.loss.margin) == (1000000, 8, 0.1, 0.3)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps, cfg.optim.schedule) == \
        (1e-3, 0.2, 2000, "cosine")
    assert cfg.train.global_batch_size == 32768 and cfg.train.precision == "bf16"
    b32 = C.build_config("vit_b32_paper")        # inherits the recipe through `base:`
    assert b32.model.name == "ViT-B-32-224" and b32.optim.weight_decay == 0.2 and b32.loss.l == 8
    big = C.build_config("vit_bigg14_rope2d")
    assert big.model.overrides == {"pos_embed": "rope2d"} and big.model.grad_checkpointing


def test_preset_by_path_and_by_name(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("base: fashion_mnist_tiny\ntrain:\n  steps: 7\n")
    cfg = C.build_config(str(p), ["optim.lr=5e-4", "data.aug.flip=false", "model.overrides.pos_embed=rope2d"])
    assert cfg.train.steps == 7 and cfg.model.name == "ViT-Tiny-4-28"     # from the base chain
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float)     # YAML's "5e-4" string fixed
    assert cfg.data.aug.flip is False and cfg.model.overrides == {"pos_embed": "rope2d"}
    with pytest.raises(MLCDError, match="no_such_preset"):
        C.build_config("no_such_preset")


def test_unknown_key_and_bad_types_name_the_key(tmp_path):
    with pytest.raises(MLCDError, match=r"'train.stepz'.*did you mean 'train.steps'"):
        _ok(**{"train.stepz": 3})
    with pytest.raises(MLCDError, match="'optim.lr'"):
        _ok(**{"optim.lr": "fast"})
    with pytest.raises(MLCDError, match="'data.aug.flip'"):
        _ok(**{"data.aug.flip": 3})
    with pytest.raises(MLCDError, match="key=value"):
        C.build_config(None, ["train.steps"])
    p = tmp_path / "bad.yaml"
    p.write_text("loss:\n  nmae: mlcd\n")
    with pytest.raises(MLCDError, match=r"bad.yaml.*'loss.nmae'"):
        C.build_config(str(p))


def test_validation_messages_name_the_key():
    with pytest.raises(MLCDError, match="'train.global_batch_size'.*not divisible by the world size 3"):
        C.validate(_ok(), world_size=3)
    C.validate(_ok(), world_size=4)
    with pytest.raises(MLCDError, match="'loss.name'"):
        C.validate(_ok(**{"loss.name": "softmax"}))
    with pytest.raises(MLCDError, match="'loss.sample_rate'"):
        C.validate(_ok(**{"loss.sample_rate": 0}))
    with pytest.raises(MLCDError, match="'output_dir'"):
        C.validate(C.build_config(None, ["data.synthetic=true", "loss.num_classes=3", "train.steps=1",
                                         "train.global_batch_size=1"]))
    with pytest.raises(MLCDError, match="'data.shards'"):
        C.validate(_ok(**{"data.synthetic": "false"}))
    real = C.build_config("fashion_mnist_tiny", ["output_dir=/tmp/x"])
    with pytest.raises(MLCDError, match=r"'loss.num_classes'.*k=64"):
        C.validate(C.build_config("fashion_mnist_tiny", ["loss.num_classes=100"]), 1, {"k": 64, "topk": 8})
    with pytest.raises(MLCDError, match=r"'loss.l'.*topk=2"):
        C.validate(real, 1, {"k": 64, "topk": 2})
    C.validate(real, 1, {"k": 64, "topk": 8})
    assert real.loss.num_classes == 64            # read from the label metadata


@pytest.mark.parametrize("key,value", [
    ("optim.pfc_lr", -0.001), ("optim.min_lr_ratio", -0.5), ("optim.min_lr_ratio", 1.5),
    ("loss.scale", -64), ("loss.scale", 0), ("loss.margin", 4.0), ("loss.margin", -0.1),
    ("optim.betas", "[1.5, 0.9]"), ("optim.weight_decay", -1), ("optim.pfc_weight_decay", -1)])
def test_out_of_range_values_name_the_key(key, value):
    """A negative floor would drive the learning rate below 0 at the end of the schedule; a
    margin past pi/2 turns cos(theta + m) upside down: all refused before any step."""
    C.validate(_ok())
    with pytest.raises(MLCDError, match=f"'{key}'"):
        C.validate(_ok(**{key: value}))


def test_resolved_config_round_trips(tmp_path):
    cfg = C.build_config("fashion_mnist_tiny", ["train.steps=11", "model.overrides={width: 48}"])
    C.save_config(cfg, tmp_path / "config.yaml")
    again = C.from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert C.to_dict(again) == C.to_dict(cfg)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
