"""Starting a run from weights: ``init.checkpoint=PATH`` (the paper's 336 px stage, fine-tuning).

``PATH`` is a native export ``X.pt`` (with its ``X.json``; ``mlcd convert --from-hf`` writes
one too), a trainer ``model.pt``, a checkpoint folder ``OUT/checkpoints/step_XXXXXXXX``, or a
run folder (its newest complete checkpoint).  Only the backbone is taken: the Partial FC,
the optimisers and the schedule start fresh at step 0.

What may differ between the source and the new tower:

- the image size of a ViT with learned absolute positions (``pos_embed=abs``): the
  ``positional_embedding`` rows of the patch grid are resized bicubically to the new grid,
  the class token's row is kept as it is (:func:`resize_pos_embed`, the operation of
  open_clip's ``resize_pos_embed``);
- the image size of a RoPE2D ViT (no position table) or of a ResNet (any size): nothing to do.

Anything else (another width, depth, patch, projection, family) is an MLCDError naming the
tensors: missing, unexpected, and those whose shapes differ.  Every file is loaded with
``torch.load(weights_only=True)`` (``mlcd_train.export.torch_load``).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from mlcd_train.utils.errors import MLCDError

POS_KEY = "positional_embedding"


def read_weights(path: str) -> tuple[dict, dict | None, str]:
    """(flat backbone state dict, model_config dict or None, the file it came from)."""
    from mlcd_train import export as E

    p = Path(path)
    if not p.exists():
        raise MLCDError(f"config key 'init.checkpoint': {path}: no such file or folder")
    if p.is_dir():
        sd, cfg, _, ckpt = E.read_train_checkpoint(p)
        return sd, cfg, str(ckpt)
    sd, meta = E.load_native(p)
    return sd, (meta or {}).get("model_config"), str(p)


def resize_pos_embed(pos: torch.Tensor, new_grid: int, extra_tokens: int = 1) -> torch.Tensor:
    """``pos`` [extra + g*g, D] -> [extra + new_grid**2, D]: the first ``extra_tokens`` rows
    (the class token) unchanged, the g x g patch rows resized bicubically as an image of D
    channels (align_corners=False, antialias=True: open_clip's defaults; torch's antialiased
    bicubic uses the a=-0.5 kernel, also when enlarging), in fp32, back in ``pos``'s dtype."""
    if pos.ndim != 2:
        raise ValueError(f"positional embedding must be [tokens, width], got {tuple(pos.shape)}")
    head, grid_rows = pos[:extra_tokens], pos[extra_tokens:]
    old = math.isqrt(grid_rows.shape[0])
    if old * old != grid_rows.shape[0]:
        raise ValueError(f"positional embedding has {grid_rows.shape[0]} patch rows, not a square grid")
    if old == new_grid:
        return pos.clone()
    width = pos.shape[1]
    img = grid_rows.float().reshape(1, old, old, width).permute(0, 3, 1, 2)  # [1, D, g, g], row-major grid
    img = F.interpolate(img, size=(new_grid, new_grid), mode="bicubic", align_corners=False,
                        antialias=True)
    rows = img.permute(0, 2, 3, 1).reshape(new_grid * new_grid, width).to(pos.dtype)
    return torch.cat([head, rows], dim=0)


def adapt_state_dict(src: dict, model: torch.nn.Module, where: str) -> tuple[dict, list[str]]:
    """``src`` made to fit ``model``: (state dict, notes on what was adapted).  Raises an
    MLCDError naming every tensor that is missing, unexpected or of another shape."""
    own = model.state_dict()
    missing = sorted(set(own) - set(src))
    unexpected = sorted(set(src) - set(own))
    out, notes, shapes = {}, [], []
    cfg = getattr(model, "config", None)
    for key, target in own.items():
        if key not in src:
            continue
        value = src[key]
        if not torch.is_tensor(value):
            shapes.append(f"{key} (not a tensor)")
            continue
        if tuple(value.shape) != tuple(target.shape):
            if (key == POS_KEY and getattr(cfg, "pos_embed", None) == "abs" and value.ndim == 2
                    and value.shape[1] == target.shape[1]
                    and math.isqrt(value.shape[0] - 1) ** 2 == value.shape[0] - 1):
                old = math.isqrt(value.shape[0] - 1)
                value = resize_pos_embed(value, cfg.grid_size)
                notes.append(f"{key} resized from a {old}x{old} to a {cfg.grid_size}x{cfg.grid_size} patch "
                             "grid (bicubic; class row kept)")
            else:
                shapes.append(f"{key} {tuple(value.shape)} vs {tuple(target.shape)}")
                continue
        out[key] = value.to(dtype=target.dtype)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected {_short(unexpected)}")
        if shapes:
            parts.append(f"shape (source vs this model) {_short(shapes)}")
        name = getattr(cfg, "name", type(model).__name__)
        raise MLCDError(f"config key 'init.checkpoint': {where} does not fit model {name}: " + "; ".join(parts))
    return out, notes


def _short(items: list[str], n: int = 6) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + "]" + more


def init_backbone(model: torch.nn.Module, path: str) -> tuple[str, list[str]]:
    """Load the backbone weights of ``path`` into ``model`` in place (its parameters keep
    their identity, so an optimiser or DDP built over them stays valid).
    Returns (the file read, notes)."""
    src, src_cfg, where = read_weights(path)
    cfg = getattr(model, "config", None)
    if src_cfg is not None and cfg is not None:
        fam_src = src_cfg.get("family", "vit")
        fam_own = "resnet" if type(cfg).__name__ == "ResNetConfig" else "vit"
        if fam_src != fam_own:
            raise MLCDError(f"config key 'init.checkpoint': {where} holds a {fam_src} tower, this run trains "
                            f"a {fam_own} ({cfg.name})")
    state, notes = adapt_state_dict(src, model, where)
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return where, notes
