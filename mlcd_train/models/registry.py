"""Named tower presets of two families, ``vit`` and ``resnet``.

``create_model(name, **overrides)`` builds a tower from its config alone (no download).
Every tower has the interface the trainer, ``mlcd export``, the ``mlcd:`` embedder and the
probe use (docs/architecture.md): ``model(pixels [B, 3, S, S]) -> [B, embed_dim]``,
``embed_dim``, ``config`` (a dataclass with ``name``, ``image_size``, ``output_dim``) and
``set_grad_checkpointing``.

ViT overrides: ``width``, ``layers``, ``heads``, ``patch_size``, ``image_size``, ``mlp_ratio``,
``pos_embed`` ("abs" or "rope2d"), ``output_dim`` (0 or None: no projection), ``act`` ("gelu"
or "quick_gelu"), ``drop_path``.  ResNet overrides: ``image_size``, ``block``, ``layers``,
``channels``, ``stem`` ("imagenet" or "cifar"), ``output_dim``, ``drop_path``.

The CLIP-sized presets follow the MLCD paper (configs as CLIP: B/32, B/16 with width 768 and
embed 512, L/14 with width 1024 and embed 768); bigG/14 is the RoPE2D tower of the released
MLCD bigG models (48 layers, width 1664, 16 heads, MLP 8192, no projection).  Every ViT preset
also builds with ``pos_embed="rope2d"`` or ``"abs"``.  The released ViT-L/14-336 uses
QuickGELU; its Hugging Face config says so and ``mlcd convert --from-hf`` picks it up.
``resnet18`` / ``resnet50`` are timm's ImageNet ResNets (the paper's small-scale ablation
trains a ResNet-50); the ``ResNet-*-28`` presets use a CIFAR-style stem for 28-64 px images.
The Tiny/Small ViT and the small ResNet presets are for CPU work.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from mlcd_train.utils.errors import MLCDError

from .resnet import RESNET_FIELDS, ResNetConfig, ResNetTower
from .resnet import config_dict as _resnet_dict
from .vit import CONFIG_FIELDS, ViTConfig, VisionTransformer

FAMILIES = ("vit", "resnet")

_BIGG = dict(width=1664, layers=48, heads=16, mlp_ratio=8192 / 1664, patch_size=14, pos_embed="rope2d",
             output_dim=None)

PRESETS: dict[str, dict[str, Any]] = {
    "ViT-B-32-224": dict(image_size=224, patch_size=32, width=768, layers=12, heads=12, output_dim=512),
    "ViT-B-16-224": dict(image_size=224, patch_size=16, width=768, layers=12, heads=12, output_dim=512),
    "ViT-L-14-224": dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16, output_dim=768),
    "ViT-L-14-336": dict(image_size=336, patch_size=14, width=1024, layers=24, heads=16, output_dim=768),
    "ViT-bigG-14-224": dict(image_size=224, **_BIGG),
    "ViT-bigG-14-336": dict(image_size=336, **_BIGG),
    "ViT-bigG-14-448": dict(image_size=448, **_BIGG),
    # CPU presets (tests, the Fashion-MNIST demo, quick experiments)
    "ViT-Tiny-4-28": dict(image_size=28, patch_size=4, width=96, layers=4, heads=3, output_dim=64),
    "ViT-Tiny-4-32": dict(image_size=32, patch_size=4, width=128, layers=4, heads=4, output_dim=64),
    "ViT-Small-8-64": dict(image_size=64, patch_size=8, width=192, layers=6, heads=3, output_dim=128),
    # ResNets (timm's implementation)
    "resnet18": dict(family="resnet", image_size=224, block="basic", layers=[2, 2, 2, 2]),
    "resnet50": dict(family="resnet", image_size=224, block="bottleneck", layers=[3, 4, 6, 3]),
    # CIFAR-style stem (3x3 stride 1, no max-pool) for 28-64 px images; w16/w32: stage widths
    # 16-128 / 32-256 instead of 64-512 (CPU budgets)
    "ResNet-18-28": dict(family="resnet", image_size=28, block="basic", layers=[2, 2, 2, 2], stem="cifar"),
    "ResNet-18-w32-28": dict(family="resnet", image_size=28, block="basic", layers=[2, 2, 2, 2], stem="cifar",
                             channels=[32, 64, 128, 256]),
    "ResNet-18-w16-28": dict(family="resnet", image_size=28, block="basic", layers=[2, 2, 2, 2], stem="cifar",
                             channels=[16, 32, 64, 128]),
    "ResNet-10-w16-28": dict(family="resnet", image_size=28, block="basic", layers=[1, 1, 1, 1], stem="cifar",
                             channels=[16, 32, 64, 128]),
}


def list_models(family: str | None = None) -> list[str]:
    """Names accepted by :func:`create_model` (of one family when given)."""
    return [n for n, p in PRESETS.items() if family is None or p.get("family", "vit") == family]


def family_of(name: str) -> str:
    """The family (``vit`` or ``resnet``) of preset ``name``."""
    if name not in PRESETS:
        raise MLCDError(f"model {name!r}: unknown preset; known: {', '.join(list_models())}")
    return PRESETS[name].get("family", "vit")


def _fields_of(family: str) -> tuple:
    return RESNET_FIELDS if family == "resnet" else CONFIG_FIELDS


def get_model_config(name: str, **overrides) -> ViTConfig | ResNetConfig:
    """The validated config of preset ``name`` with ``overrides`` applied."""
    family = family_of(name)
    allowed = [f for f in _fields_of(family) if f not in ("name", "family")]
    bad = sorted(set(overrides) - set(allowed))
    if bad:
        raise MLCDError(f"model {name!r}: unknown override(s) {bad}; allowed for a {family} tower: "
                        f"{', '.join(allowed)}")
    if family == "resnet":
        values = {**PRESETS[name], "name": name}
        values.update(overrides)
        return ResNetConfig(**values).validate()
    values = {"act": "gelu", "mlp_ratio": 4.0, "pos_embed": "abs", **PRESETS[name], "name": name}
    values.update(overrides)
    return ViTConfig(**values).validate()


def build_model(config: ViTConfig | ResNetConfig):
    """The tower of a validated config (random initialisation)."""
    if isinstance(config, ResNetConfig):
        return ResNetTower(config)
    return VisionTransformer(config)


def create_model(name: str, **overrides):
    """Build preset ``name`` (see :func:`list_models`) with ``overrides``; random initialisation."""
    return build_model(get_model_config(name, **overrides))


def model_config_to_dict(config) -> dict:
    """JSON-friendly dict of a config (or of a model's config); always names its ``family``."""
    if isinstance(config, torch.nn.Module):
        config = config.config
    if isinstance(config, ResNetConfig):
        return _resnet_dict(config)
    return {"family": "vit", **dataclasses.asdict(config)}


def config_from_dict(d: dict, where: str = "model_config") -> ViTConfig | ResNetConfig:
    """Validated config from a dict written by :func:`model_config_to_dict` (a dict without
    ``family`` is a ViT's: exports written before ResNets existed)."""
    if not isinstance(d, dict):
        raise MLCDError(f"{where}: expected a dict of model settings, got {type(d).__name__}")
    d = dict(d)
    family = d.pop("family", "vit")
    if family not in FAMILIES:
        raise MLCDError(f"{where}: unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    if family == "resnet":
        d.pop("timm_kwargs", None)  # derived, written for users who build timm's model by hand
        bad = sorted(set(d) - set(RESNET_FIELDS))
        if bad:
            raise MLCDError(f"{where}: unknown key(s) {bad}; allowed: {', '.join(RESNET_FIELDS)}")
        missing = [k for k in ("image_size", "block", "layers", "channels") if k not in d]
        if missing:
            raise MLCDError(f"{where}: missing key(s) {missing}")
        try:
            return ResNetConfig(**d).validate()
        except TypeError as exc:
            raise MLCDError(f"{where}: {exc}") from None
    bad = sorted(set(d) - set(CONFIG_FIELDS))
    if bad:
        raise MLCDError(f"{where}: unknown key(s) {bad}; allowed: {', '.join(CONFIG_FIELDS)}")
    missing = [k for k in ("image_size", "patch_size", "width", "layers", "heads", "pos_embed") if k not in d]
    if missing:
        raise MLCDError(f"{where}: missing key(s) {missing}")
    return ViTConfig(**d).validate()


def create_model_from_config(d: dict):
    """Build the tower described by a dict from :func:`model_config_to_dict`."""
    return build_model(config_from_dict(dict(d)))
