"""ResNet students: timm's ``ResNet``, with a CIFAR-style stem for small images.

The tower *is* a ``timm.models.resnet.ResNet`` (a subclass that only adds what the trainer
needs: ``config``, ``embed_dim``), so its state dict has timm's names and an export loads
into timm's own model with ``strict=True``::

    import timm, torch
    from mlcd_train.models.resnet import timm_resnet          # or, by hand, see below
    model = timm_resnet(json.load(open("student.json"))["model_config"])
    model.load_state_dict(torch.load("student.pt", weights_only=True))

By hand: ``timm.models.resnet.ResNet(**config["timm_kwargs"])`` (the sidecar records them);
for ``stem="cifar"`` then replace ``model.conv1`` by ``nn.Conv2d(3, 64, 3, 1, 1,
bias=False)`` and ``model.maxpool`` by ``nn.Identity()`` (the usual adaptation of a ResNet to
28-64 px images: no 4x down-sampling before the first stage).  The ImageNet presets
``resnet18`` / ``resnet50`` are timm's own architectures: ``timm.create_model("resnet50",
num_classes=output_dim or 0)`` loads their exports as they are.

``output_dim`` is timm's ``num_classes``: the ``fc`` layer after global average pooling is the
embedding projection (``None``: no projection, the pooled features are the embedding).
``drop_path`` is timm's ``drop_path_rate`` (stochastic depth, linearly increasing over blocks).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Optional

from torch import nn

from mlcd_train.utils.errors import MLCDError

BLOCKS = ("basic", "bottleneck")
STEMS = ("imagenet", "cifar")
STEM_CHANNELS = 64  # timm's plain stem always has 64 output channels


@dataclass
class ResNetConfig:
    """Everything needed to build a ResNet tower (``model_config_to_dict`` writes it as JSON)."""

    name: str = "custom"
    family: str = "resnet"
    image_size: int = 224
    block: str = "basic"                 # basic (ResNet-18/34) | bottleneck (ResNet-50/101)
    layers: list = field(default_factory=lambda: [2, 2, 2, 2])   # blocks per stage
    channels: list = field(default_factory=lambda: [64, 128, 256, 512])  # stage widths (before expansion)
    stem: str = "imagenet"               # imagenet: 7x7/2 conv + max-pool | cifar: 3x3/1 conv, no pool
    output_dim: Optional[int] = None     # the fc projection after pooling; None: pooled features
    drop_path: float = 0.0               # stochastic depth rate (timm drop_path_rate)

    def validate(self) -> "ResNetConfig":
        where = f"model config {self.name!r}"
        if self.family != "resnet":
            raise MLCDError(f"{where}: family must be 'resnet', got {self.family!r}")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size <= 0:
            raise MLCDError(f"{where}: image_size must be a positive integer, got {self.image_size!r}")
        if self.block not in BLOCKS:
            raise MLCDError(f"{where}: block must be one of {BLOCKS}, got {self.block!r}")
        if self.stem not in STEMS:
            raise MLCDError(f"{where}: stem must be one of {STEMS}, got {self.stem!r}")
        for key in ("layers", "channels"):
            v = getattr(self, key)
            if (not isinstance(v, (list, tuple)) or len(v) != 4
                    or any(isinstance(x, bool) or not isinstance(x, int) or x <= 0 for x in v)):
                raise MLCDError(f"{where}: {key} must be a list of 4 positive integers, got {v!r}")
            setattr(self, key, list(v))
        if self.output_dim in (0, None):
            self.output_dim = None
        elif isinstance(self.output_dim, bool) or not isinstance(self.output_dim, int) or self.output_dim < 0:
            raise MLCDError(f"{where}: output_dim must be a positive integer or null, got {self.output_dim!r}")
        if (isinstance(self.drop_path, bool) or not isinstance(self.drop_path, (int, float))
                or not 0.0 <= float(self.drop_path) < 1.0):
            raise MLCDError(f"{where}: drop_path must be in [0, 1), got {self.drop_path!r}")
        self.drop_path = float(self.drop_path)
        return self

    @property
    def width(self) -> int:
        """Channels of the pooled features (timm's ``num_features``)."""
        return self.channels[-1] * (4 if self.block == "bottleneck" else 1)

    def timm_kwargs(self) -> dict:
        """Arguments of ``timm.models.resnet.ResNet`` for this tower (the stem swap aside)."""
        from timm.models.resnet import BasicBlock, Bottleneck

        return dict(block=BasicBlock if self.block == "basic" else Bottleneck, layers=tuple(self.layers),
                    channels=tuple(self.channels),
                    num_classes=self.output_dim or 0, drop_path_rate=self.drop_path)


RESNET_FIELDS = tuple(f.name for f in fields(ResNetConfig))


def _swap_stem(model: nn.Module, cfg: ResNetConfig) -> None:
    if cfg.stem == "cifar":
        model.conv1 = nn.Conv2d(3, STEM_CHANNELS, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()


def timm_resnet(config: dict | ResNetConfig) -> nn.Module:
    """A plain ``timm.models.resnet.ResNet`` of the shape ``config`` describes (random weights):
    what a user without mlcd builds to load an export."""
    from timm.models.resnet import ResNet

    if isinstance(config, ResNetConfig):
        cfg = config
    else:
        from mlcd_train.models.registry import config_from_dict

        cfg = config_from_dict(config)
    model = ResNet(**cfg.timm_kwargs())
    _swap_stem(model, cfg)
    return model


def _tower_class():
    from timm.models.resnet import ResNet

    class ResNetTower(ResNet):
        """timm's ResNet plus the trainer's interface: ``config``, ``embed_dim``,
        ``forward(pixels) -> [B, embed_dim]`` (timm's forward: pooled features through ``fc``),
        ``set_grad_checkpointing`` (timm's)."""

        def __init__(self, config: ResNetConfig):
            super().__init__(**config.timm_kwargs())
            _swap_stem(self, config)
            self.config = config

        @property
        def embed_dim(self) -> int:
            return self.config.output_dim or self.config.width

        def no_weight_decay(self) -> set[str]:
            return set()

    return ResNetTower


_TOWER = None


def ResNetTower(config: ResNetConfig) -> nn.Module:  # noqa: N802 - a class built lazily (timm imports slowly)
    global _TOWER
    if _TOWER is None:
        _TOWER = _tower_class()
    return _TOWER(config)


def is_resnet(model: nn.Module) -> bool:
    return isinstance(getattr(model, "config", None), ResNetConfig)


def config_dict(cfg: ResNetConfig) -> dict:
    d = asdict(cfg)
    d["timm_kwargs"] = {k: (v.__name__ if isinstance(v, type) else (list(v) if isinstance(v, tuple) else v))
                        for k, v in cfg.timm_kwargs().items()}
    return d
