"""Named ViT presets.

``create_model(name, **overrides)`` builds a tower from its config alone (no download).
Overrides use the config's field names: ``width``, ``layers``, ``heads``, ``patch_size``,
``image_size``, ``mlp_ratio``, ``pos_embed`` ("abs" or "rope2d"), ``output_dim`` (0 or None:
no projection), ``act`` ("gelu" or "quick_gelu").

The CLIP-sized presets follow the MLCD paper (configs as CLIP: B/32, B/16 with width 768 and
embed 512, L/14 with width 1024 and embed 768); bigG/14 is the RoPE2D tower of the released
MLCD bigG models (48 layers, width 1664, 16 heads, MLP 8192, no projection).  Every preset
also builds with ``pos_embed="rope2d"`` or ``"abs"``.  The released ViT-L/14-336 uses
QuickGELU; its Hugging Face config says so and ``mlcd convert --from-hf`` picks it up.
The Tiny/Small presets are for CPU work on 28 to 64 px images.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from mlcd_train.utils.errors import MLCDError

from .vit import CONFIG_FIELDS, ViTConfig, VisionTransformer

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
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return list(PRESETS)


def get_model_config(name: str, **overrides) -> ViTConfig:
    """The validated config of preset ``name`` with ``overrides`` applied."""
    if name not in PRESETS:
        raise MLCDError(f"model {name!r}: unknown preset; known: {', '.join(list_models())}")
    bad = sorted(set(overrides) - set(CONFIG_FIELDS) - {"name"})
    if bad:
        raise MLCDError(f"model {name!r}: unknown override(s) {bad}; allowed: {', '.join(CONFIG_FIELDS[1:])}")
    values = {"act": "gelu", "mlp_ratio": 4.0, "pos_embed": "abs", **PRESETS[name], "name": name}
    values.update(overrides)
    return ViTConfig(**values).validate()


def create_model(name: str, **overrides) -> VisionTransformer:
    """Build preset ``name`` (see :func:`list_models`) with ``overrides``; random initialisation."""
    return VisionTransformer(get_model_config(name, **overrides))


def model_config_to_dict(config: ViTConfig | VisionTransformer) -> dict:
    """JSON-friendly dict of a config (or of a model's config)."""
    if isinstance(config, VisionTransformer):
        config = config.config
    return dataclasses.asdict(config)


def config_from_dict(d: dict, where: str = "model_config") -> ViTConfig:
    """Validated ViTConfig from a dict written by :func:`model_config_to_dict`."""
    if not isinstance(d, dict):
        raise MLCDError(f"{where}: expected a dict of model settings, got {type(d).__name__}")
    bad = sorted(set(d) - set(CONFIG_FIELDS))
    if bad:
        raise MLCDError(f"{where}: unknown key(s) {bad}; allowed: {', '.join(CONFIG_FIELDS)}")
    missing = [k for k in ("image_size", "patch_size", "width", "layers", "heads", "pos_embed") if k not in d]
    if missing:
        raise MLCDError(f"{where}: missing key(s) {missing}")
    return ViTConfig(**d).validate()


def create_model_from_config(d: dict) -> VisionTransformer:
    """Build the tower described by a dict from :func:`model_config_to_dict`."""
    return VisionTransformer(config_from_dict(dict(d)))
