"""The MLCD vision tower: one ViT, two position schemes.

``pos_embed="abs"``: learned absolute positions, CLIP style.  The state dict uses open_clip's
``VisionTransformer`` names (``conv1``, ``class_embedding``, ``positional_embedding``,
``ln_pre``, ``transformer.resblocks.N.{ln_1, attn.in_proj_weight, attn.in_proj_bias,
attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_post``, ``proj``), so open_clip's visual
tower of the same size loads it as is.

``pos_embed="rope2d"``: the MLCD bigG kind.  No absolute position table; every patch token's
query and key are rotated by angles built from its row and column index (half of the rotary
features from the row, half from the column), the class token's angles are the learned
``class_pos_emb`` [1, head_dim/2].  Any input size works without interpolation, non-square
grids included.  The state dict is the native layout the public conversion script reads:
``attn.in_proj.weight``/``.bias`` instead of nn.MultiheadAttention's names, no
``positional_embedding``.

Both kinds: pre-norm blocks, ``F.scaled_dot_product_attention``, layer norm eps 1e-5,
exact (erf) GELU or QuickGELU, pooled output = ``ln_post`` of the class token times ``proj``.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mlcd_train.utils.errors import MLCDError

POS_EMBEDS = ("abs", "rope2d")
ACTS = ("gelu", "quick_gelu")
ROPE_THETA = 10000.0
LN_EPS = 1e-5


@dataclass
class ViTConfig:
    """Everything needed to build the tower; ``model_config_to_dict`` / ``create_model_from_config``
    turn it into JSON and back."""

    name: str = "custom"
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    pos_embed: str = "abs"
    output_dim: Optional[int] = 512
    act: str = "gelu"
    drop_path: float = 0.0          # stochastic depth: block i of L skipped with rate drop_path * i / (L - 1)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_dim(self) -> int:
        return int(round(self.width * self.mlp_ratio))

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def validate(self) -> "ViTConfig":
        """Raise MLCDError naming the field at fault; normalises ``output_dim`` 0 -> None."""
        for key in ("image_size", "patch_size", "width", "layers", "heads"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise MLCDError(f"model config {self.name!r}: {key} must be a positive integer, got {value!r}")
        if not isinstance(self.mlp_ratio, (int, float)) or self.mlp_ratio <= 0:
            raise MLCDError(f"model config {self.name!r}: mlp_ratio must be positive, got {self.mlp_ratio!r}")
        if self.pos_embed not in POS_EMBEDS:
            raise MLCDError(f"model config {self.name!r}: pos_embed must be one of {POS_EMBEDS}, "
                            f"got {self.pos_embed!r}")
        if self.act not in ACTS:
            raise MLCDError(f"model config {self.name!r}: act must be one of {ACTS}, got {self.act!r}")
        if self.output_dim in (0, None):
            self.output_dim = None
        elif isinstance(self.output_dim, bool) or not isinstance(self.output_dim, int) or self.output_dim < 0:
            raise MLCDError(f"model config {self.name!r}: output_dim must be a positive integer, 0 or None, "
                            f"got {self.output_dim!r}")
        if self.width % self.heads:
            raise MLCDError(f"model config {self.name!r}: heads={self.heads} does not divide width={self.width}")
        if self.pos_embed == "rope2d" and self.head_dim % 4:
            raise MLCDError(f"model config {self.name!r}: RoPE2D needs a head width divisible by 4 "
                            f"(width {self.width} / heads {self.heads} = {self.head_dim})")
        if (isinstance(self.drop_path, bool) or not isinstance(self.drop_path, (int, float))
                or not 0.0 <= float(self.drop_path) < 1.0):
            raise MLCDError(f"model config {self.name!r}: drop_path must be in [0, 1), got {self.drop_path!r}")
        self.drop_path = float(self.drop_path)
        if self.image_size % self.patch_size:
            raise MLCDError(f"model config {self.name!r}: image_size={self.image_size} is not divisible by "
                            f"patch_size={self.patch_size}")
        return self


CONFIG_FIELDS = tuple(f.name for f in fields(ViTConfig))


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation of OpenAI's CLIP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [..., T, hd] by angles whose cos/sin are [T, hd]; computed in fp32."""
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection.

    ``native_rope=False`` names its parameters as nn.MultiheadAttention does
    (``in_proj_weight``, ``in_proj_bias``); ``native_rope=True`` uses a Linear ``in_proj``
    as the native RoPE2D checkpoints do.  Rows of the fused weight are [q; k; v], head h of
    each being rows h*hd:(h+1)*hd.
    """

    def __init__(self, width: int, heads: int, native_rope: bool):
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        if native_rope:
            self.in_proj = nn.Linear(width, 3 * width)
        else:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
            self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def _qkv_params(self):
        if hasattr(self, "in_proj"):
            return self.in_proj.weight, self.in_proj.bias
        return self.in_proj_weight, self.in_proj_bias

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        B, T, D = x.shape
        weight, bias = self._qkv_params()
        qkv = F.linear(x, weight, bias).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is None:
            q, k, v = qkv.unbind(0)  # [B, H, T, hd]
        else:  # rotate q and k in one pass
            q, k = _apply_rope(qkv[:2], *rope).unbind(0)
            v = qkv[2]
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(B, T, D)
        return self.out_proj(out)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a residual branch per sample with probability ``rate``, scale the
    rest by 1 / (1 - rate).  Draws from the global torch generator (the trainer seeds it per
    step, so a resumed run drops the same branches)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class ResidualBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, native_rope: bool, drop_path: float = 0.0):
        super().__init__()
        self.drop_path = drop_path
        self.ln_1 = nn.LayerNorm(width, eps=LN_EPS)
        self.attn = Attention(width, heads, native_rope)
        self.ln_2 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, mlp_dim)),
            ("gelu", QuickGELU() if act == "quick_gelu" else nn.GELU()),
            ("c_proj", nn.Linear(mlp_dim, width)),
        ]))

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        x = x + drop_path(self.attn(self.ln_1(x), rope), self.drop_path, self.training)
        x = x + drop_path(self.mlp(self.ln_2(x)), self.drop_path, self.training)
        return x


class Transformer(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        native_rope = config.pos_embed == "rope2d"
        self.resblocks = nn.ModuleList([
            ResidualBlock(config.width, config.heads, config.mlp_dim, config.act, native_rope,
                          config.drop_path * i / max(1, config.layers - 1))
            for i in range(config.layers)
        ])


class VisionTransformer(nn.Module):
    """``model(pixels)`` -> pooled embedding [B, output_dim or width];
    ``model.forward_hidden_states(pixels)`` -> [input of block 0, output of each block]."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        config.validate()
        self.config = config
        D = config.width
        scale = D ** -0.5
        self.grad_checkpointing = False
        self.conv1 = nn.Conv2d(3, D, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(D))
        if config.pos_embed == "abs":
            self.positional_embedding = nn.Parameter(scale * torch.randn(config.grid_size ** 2 + 1, D))
        else:
            self.class_pos_emb = nn.Parameter(torch.randn(1, config.head_dim // 2))
        self.ln_pre = nn.LayerNorm(D, eps=LN_EPS)
        self.transformer = Transformer(config)
        self.ln_post = nn.LayerNorm(D, eps=LN_EPS)
        if config.output_dim:
            self.proj = nn.Parameter(scale * torch.randn(D, config.output_dim))
        else:
            self.proj = None
        self._rope_cache: dict = {}
        self._init_blocks()

    def _init_blocks(self) -> None:
        # CLIP's initialisation: attention and fc inputs ~ D^-0.5, residual outputs scaled by depth.
        D, L = self.config.width, self.config.layers
        attn_std = D ** -0.5
        proj_std = D ** -0.5 * (2 * L) ** -0.5
        fc_std = (2 * D) ** -0.5
        for block in self.transformer.resblocks:
            weight, bias = block.attn._qkv_params()
            nn.init.normal_(weight, std=attn_std)
            nn.init.zeros_(bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.zeros_(block.mlp.c_fc.bias)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            nn.init.zeros_(block.mlp.c_proj.bias)

    # ------------------------------------------------------------------ helpers
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)

    def no_weight_decay(self) -> set[str]:
        """Parameter names usually kept out of weight decay (besides biases and norms)."""
        names = {"class_embedding", "positional_embedding", "class_pos_emb"}
        return {n for n, _ in self.named_parameters() if n in names}

    @property
    def embed_dim(self) -> int:
        return self.config.output_dim or self.config.width

    def _patch_angles(self, gh: int, gw: int, device: torch.device) -> torch.Tensor:
        """Rotary angles of the gh x gw patch tokens (row-major), [gh*gw, head_dim/2], fp32."""
        key = (gh, gw, str(device))
        compiling = torch.compiler.is_compiling()  # no cache mutation inside a compiled graph
        angles = None if compiling else self._rope_cache.get(key)
        if angles is None:
            quarter = self.config.head_dim // 4
            # 10000^(-2i/(head_dim/2)), i < head_dim/4: one frequency set shared by rows and columns
            inv_freq = ROPE_THETA ** (-torch.arange(0, quarter, dtype=torch.float32, device=device) / quarter)
            rows = torch.arange(gh, device=device, dtype=torch.float32).repeat_interleave(gw)
            cols = torch.arange(gw, device=device, dtype=torch.float32).repeat(gh)
            angles = torch.cat([rows[:, None] * inv_freq, cols[:, None] * inv_freq], dim=1)
            if not compiling:
                self._rope_cache = {key: angles}  # keep one entry: sizes rarely change within a run
        return angles

    def _rope(self, gh: int, gw: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        angles = torch.cat([self.class_pos_emb.float(), self._patch_angles(gh, gw, device)], dim=0)
        angles = torch.cat([angles, angles], dim=1)  # [T, head_dim]
        return angles.cos(), angles.sin()

    def _embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, Optional[tuple]]:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels [B, 3, H, W], got {tuple(pixels.shape)}")
        x = self.conv1(pixels.to(self.conv1.weight.dtype))  # [B, D, gh, gw]
        B, D, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(B, 1, D)
        x = torch.cat([cls, x], dim=1)
        rope = None
        if self.config.pos_embed == "abs":
            if x.shape[1] != self.positional_embedding.shape[0]:
                raise ValueError(
                    f"{self.config.name}: input {tuple(pixels.shape[-2:])} gives a {gh}x{gw} patch grid, but the "
                    f"learned absolute positions are for {self.config.grid_size}x{self.config.grid_size} "
                    f"(image_size {self.config.image_size}); resize the input or use pos_embed='rope2d'")
            x = x + self.positional_embedding.to(x.dtype)
        else:
            rope = self._rope(gh, gw, x.device)
        return self.ln_pre(x), rope

    def _run_blocks(self, x: torch.Tensor, rope, collect: Optional[list]) -> torch.Tensor:
        for block in self.transformer.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
            if collect is not None:
                collect.append(x)
        return x

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.ln_post(x[:, 0])
        if self.proj is not None:
            pooled = pooled @ self.proj
        return pooled

    # ------------------------------------------------------------------ forward
    def forward_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Last block's output [B, T, D] (class token first, no ln_post)."""
        x, rope = self._embed(pixels)
        return self._run_blocks(x, rope, None)

    def forward_hidden_states(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """[input of the first block (after ln_pre), output of block 1, ..., output of block L]."""
        x, rope = self._embed(pixels)
        states = [x]
        self._run_blocks(x, rope, states)
        return states

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._pool(self.forward_tokens(pixels))

    def extra_repr(self) -> str:
        c = self.config
        return (f"name={c.name}, image_size={c.image_size}, patch={c.patch_size}, width={c.width}, "
                f"layers={c.layers}, heads={c.heads}, pos_embed={c.pos_embed}, output_dim={c.output_dim}, act={c.act}")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def vit_flops_per_image(config: ViTConfig, image_size: Optional[int] = None) -> float:
    """Forward FLOPs (2 per multiply-add) of one image: patch embed, blocks, projection."""
    size = image_size or config.image_size
    T = (size // config.patch_size) ** 2 + 1
    D, L, M = config.width, config.layers, config.mlp_dim
    per_block = 2 * T * (3 * D * D + D * D + 2 * D * M) + 2 * 2 * T * T * D
    patch = 2 * (T - 1) * 3 * config.patch_size ** 2 * D
    proj = 2 * D * (config.output_dim or 0)
    return float(L * per_block + patch + proj)


__all__ = ["ViTConfig", "VisionTransformer", "QuickGELU", "CONFIG_FIELDS", "count_params",
           "vit_flops_per_image"]
