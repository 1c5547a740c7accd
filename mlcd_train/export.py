"""``mlcd export``: the backbone of a training checkpoint as a flat native state dict.

    mlcd export --checkpoint OUT --out mlcd_vit.pt

``--checkpoint`` is a trainer checkpoint file (``OUT/checkpoints/step_XXXXXXXX/model.pt``), a
step folder, or a run's output folder (its newest complete checkpoint: the highest
``step_*`` folder that has ``meta.json``).  Writes, each atomically:

- ``X.pt``: the flat backbone state dict (tensors only, no ``module.`` / ``_orig_mod.``
  prefixes), loadable with ``torch.load(X, weights_only=True)``.  RoPE2D towers use the
  native layout the public conversion script reads; CLIP-style towers use open_clip's names.
- ``X.json``: ``{"model_config": {...}, "image_size": N, "source": ..., "step": n}``.

Python: :func:`export_checkpoint`, :func:`load_native` (state dict + sidecar),
:func:`load_model` (our model from an export, the sidecar or the tensors telling its shape).
"""
from __future__ import annotations

import argparse
import contextlib
import textwrap
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import Optional

import torch

from mlcd_train.utils.errors import MLCDError
from mlcd_train.utils.io import atomic_save_json, atomic_torch_save, load_json

PREFIXES = ("module.", "_orig_mod.")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_STEP_RE = re.compile(r"^step_(\d+)$")


# --------------------------------------------------------------------------- reading
def torch_load(path: str | os.PathLike) -> object:
    """``torch.load(weights_only=True)`` on CPU; unreadable or truncated files are MLCDErrors."""
    path = Path(path)
    if not path.is_file():
        raise MLCDError(f"{path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as exc:
        raise MLCDError(f"{path}: not a readable torch checkpoint (truncated or not written by torch.save): "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    except Exception as exc:  # pickle.UnpicklingError from weights_only, and friends
        raise MLCDError(f"{path}: cannot be loaded safely with weights_only=True "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def strip_prefixes(state_dict: dict) -> dict:
    """Remove DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes, in any nesting order."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in PREFIXES:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        out[key] = value
    return out


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The ``model.pt`` that ``path`` names: a file, a step folder, a checkpoints folder or a run folder."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise MLCDError(f"{path}: no such checkpoint file or folder")
    if (path / "model.pt").is_file() and not _STEP_RE.match(path.name):  # OUT/best, or a copied checkpoint folder
        if not (path / "meta.json").is_file():
            raise MLCDError(f"{path}: checkpoint is incomplete (no meta.json)")
        return path / "model.pt"
    if _STEP_RE.match(path.name):
        if not (path / "meta.json").is_file():
            raise MLCDError(f"{path}: checkpoint is incomplete (no meta.json); pick an earlier step or the run folder")
        if not (path / "model.pt").is_file():
            raise MLCDError(f"{path}: complete checkpoint folder without model.pt")
        return path / "model.pt"
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = []
    for sub in folder.iterdir():
        m = _STEP_RE.match(sub.name)
        if m and sub.is_dir() and (sub / "meta.json").is_file():
            steps.append((int(m.group(1)), sub))
    if not steps:
        raise MLCDError(f"{path}: no complete checkpoint (no {folder.name}/step_*/meta.json)")
    step_dir = max(steps)[1]
    if not (step_dir / "model.pt").is_file():
        raise MLCDError(f"{step_dir}: complete checkpoint folder without model.pt")
    return step_dir / "model.pt"


def read_train_checkpoint(path: str | os.PathLike) -> tuple[dict, dict, Optional[int], Path]:
    """(backbone state dict without prefixes, model_config dict, step, model.pt path)."""
    ckpt = find_checkpoint(path)
    obj = torch_load(ckpt)
    if not isinstance(obj, dict) or "state_dict" not in obj or "model_config" not in obj:
        keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise MLCDError(f"{ckpt}: not an mlcd training checkpoint (expected keys 'state_dict' and "
                        f"'model_config', found {keys})")
    if not isinstance(obj["state_dict"], dict):
        raise MLCDError(f"{ckpt}: 'state_dict' is not a dict")
    step = obj.get("step")
    return strip_prefixes(obj["state_dict"]), dict(obj["model_config"]), (int(step) if step is not None else None), ckpt


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def load_native(path: str | os.PathLike) -> tuple[dict, Optional[dict]]:
    """(flat state dict, sidecar dict or None) of a native export ``X.pt`` (+ ``X.json``).

    A trainer checkpoint (dict with ``state_dict`` and ``model_config``) is accepted too; its
    ``model_config`` then plays the sidecar's part."""
    obj = torch_load(path)
    if isinstance(obj, dict) and "state_dict" in obj and "model_config" in obj:
        cfg = dict(obj["model_config"])
        return strip_prefixes(obj["state_dict"]), {"model_config": cfg, "image_size": cfg.get("image_size")}
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MLCDError(f"{path}: not a flat state dict of tensors (an mlcd export or a native MLCD checkpoint)")
    sd = strip_prefixes(obj)
    side = sidecar_path(path)
    meta = load_json(side) if side.is_file() else None
    if meta is not None and not isinstance(meta.get("model_config"), dict):
        raise MLCDError(f"{side}: sidecar without a 'model_config' dict")
    return sd, meta


def infer_config(state_dict: dict, where: str = "checkpoint", *, image_size: Optional[int] = None,
                 heads: Optional[int] = None, act: Optional[str] = None, name: str = "custom") -> dict:
    """Model config dict read off the tensors of a native state dict.

    Width, depth, patch and MLP size from the weights; RoPE2D when ``class_pos_emb`` is
    there (heads = width / (2 * its length)), else learned absolute positions (image size
    from the position table, heads = width / 64 as in CLIP); activation ``gelu``.  Arguments
    override (and for abs, ``image_size`` must agree with the table)."""
    if "fc.weight" in state_dict or "layer1.0.conv1.weight" in state_dict:
        raise MLCDError(f"{where}: a ResNet state dict; its shape is read from the .json sidecar that "
                        "`mlcd export` writes beside it (keep X.json next to X.pt)")

    def need(key):
        if key not in state_dict:
            raise MLCDError(f"{where}: not an MLCD/CLIP vision tower state dict (missing key {key!r}; "
                            f"found {sorted(state_dict)[:6]} ...)")
        return state_dict[key]

    conv = need("conv1.weight")
    if conv.ndim != 4 or conv.shape[2] != conv.shape[3]:
        raise MLCDError(f"{where}: conv1.weight has shape {tuple(conv.shape)}, expected [width, 3, p, p]")
    if conv.shape[1] != 3:
        raise MLCDError(f"{where}: conv1.weight takes {conv.shape[1]} input channels; the towers take 3 (RGB)")
    width, patch = int(conv.shape[0]), int(conv.shape[2])
    need("class_embedding")
    layers = 0
    while f"transformer.resblocks.{layers}.ln_1.weight" in state_dict:
        layers += 1
    if layers == 0:
        raise MLCDError(f"{where}: no transformer.resblocks.0.* keys")
    mlp_dim = int(need("transformer.resblocks.0.mlp.c_fc.weight").shape[0])
    rope = "class_pos_emb" in state_dict
    if rope:
        head_dim = 2 * int(state_dict["class_pos_emb"].shape[-1])
        if heads is None:
            if width % head_dim:
                raise MLCDError(f"{where}: class_pos_emb gives head width {head_dim}, which does not divide "
                                f"width {width}; pass --num_heads")
            heads = width // head_dim
        elif heads > 0 and width // heads != head_dim and width % heads == 0:
            raise MLCDError(f"{where}: --num_heads {heads} gives head width {width // heads} but class_pos_emb "
                            f"is for head width {head_dim}")
        if image_size is None:
            raise MLCDError(f"{where}: a RoPE2D checkpoint has no position table to read the image size from; "
                            f"pass --image_size (or keep the .json sidecar of mlcd export next to it)")
    else:
        pos = need("positional_embedding")
        grid = int(round((pos.shape[0] - 1) ** 0.5))
        if grid * grid + 1 != pos.shape[0]:
            raise MLCDError(f"{where}: positional_embedding has {pos.shape[0]} rows, not 1 + a square grid")
        table_size = grid * patch
        if image_size is not None and image_size != table_size:
            raise MLCDError(f"{where}: --image_size {image_size} disagrees with the learned position table "
                            f"({grid}x{grid} patches of {patch} px = {table_size} px)")
        image_size = table_size
        if heads is None:
            heads = max(1, width // 64)
    proj = state_dict.get("proj")
    cfg = dict(name=name, image_size=int(image_size), patch_size=patch, width=width, layers=layers,
               heads=int(heads), mlp_ratio=mlp_dim / width, pos_embed="rope2d" if rope else "abs",
               output_dim=int(proj.shape[1]) if proj is not None else None, act=act or "gelu")
    return cfg


def resolve_config(state_dict: dict, meta: Optional[dict], where: str, *, image_size: Optional[int] = None,
                   heads: Optional[int] = None, act: Optional[str] = None) -> dict:
    """The model config of an export: its sidecar when present (flags override), else inferred."""
    if meta is not None:
        cfg = dict(meta["model_config"])
        if cfg.get("family", "vit") != "vit":
            if image_size is not None:
                cfg["image_size"] = image_size  # a CNN takes any size
            return cfg
        if image_size is not None:
            if cfg.get("pos_embed") == "abs" and image_size != cfg.get("image_size"):
                raise MLCDError(f"{where}: --image_size {image_size} disagrees with the learned position table "
                                f"({cfg.get('image_size')} px, from the sidecar)")
            cfg["image_size"] = image_size
        if heads is not None:
            cfg["heads"] = heads
        if act is not None:
            cfg["act"] = act
        return cfg
    cfg = infer_config(state_dict, where, image_size=image_size, heads=heads, act=act)
    guessed = ([f"{cfg['heads']} heads (width / 64, CLIP's rule)"] if heads is None and cfg["pos_embed"] == "abs" else []) \
        + (["activation gelu"] if act is None else [])
    if guessed:
        # not visible in the tensors, and the conversion check cannot catch a wrong guess
        # (both sides are built from it): say so
        print(f"mlcd: {where}: no .json sidecar; assuming {' and '.join(guessed)}; pass --num_heads / --act "
              "if the model was trained otherwise", file=sys.stderr)
    return cfg


def build_and_load(cfg: dict, state_dict: dict, where: str):
    """Our model from ``cfg`` with ``state_dict`` loaded strictly; mismatches are MLCDErrors."""
    from mlcd_train.models import create_model_from_config

    model = create_model_from_config(cfg)
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise MLCDError(f"{where}: state dict does not fit the tower of its config ({describe(cfg)}): "
                        f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in own.items():
        if tuple(state_dict[key].shape) != tuple(value.shape):
            raise MLCDError(f"{where}: {key} has shape {tuple(state_dict[key].shape)}, the config "
                            f"({cfg.get('name')}) expects {tuple(value.shape)}")
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return model.eval()


def describe(cfg: dict) -> str:
    """One line naming a model config: family, shape, image size."""
    if cfg.get("family", "vit") == "resnet":
        return (f"{cfg.get('name')} (resnet, {cfg.get('block')} blocks {cfg.get('layers')}, channels "
                f"{cfg.get('channels')}, {cfg.get('stem')} stem, {cfg.get('image_size')} px)")
    return (f"{cfg.get('name')} ({cfg.get('pos_embed')}, width {cfg.get('width')}, {cfg.get('layers')} layers, "
            f"{cfg.get('image_size')} px)")


def load_model(path: str | os.PathLike, *, image_size: Optional[int] = None, heads: Optional[int] = None,
               act: Optional[str] = None):
    """Our tower (ViT or ResNet) from a native export (or a trainer checkpoint), in eval mode, fp32."""
    sd, meta = load_native(path)
    cfg = resolve_config(sd, meta, str(path), image_size=image_size, heads=heads, act=act)
    return build_and_load(cfg, sd, str(path))


# --------------------------------------------------------------------------- writing
def save_native(state_dict: dict, model_config: dict, out: str | os.PathLike, *, source: str = "",
                step: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> tuple[Path, Path]:
    """Write ``out`` (flat state dict) and its ``.json`` sidecar, each atomically."""
    out = Path(out)
    if out.suffix != ".pt":
        raise MLCDError(f"{out}: the export must end in .pt (its sidecar is the same name with .json)")
    flat = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise MLCDError(f"{source or out}: state dict entry {key!r} is not a tensor")
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        flat[key] = value.contiguous().clone()
    meta = {"model_config": dict(model_config), "image_size": int(model_config["image_size"]),
            "source": str(source), "step": step}
    side = sidecar_path(out)
    # the sidecar goes first and comes back last: a kill between the two writes leaves new
    # weights without a sidecar (the config is then read off the tensors, with a warning),
    # never beside the old export's config (heads and activation are not in the tensors)
    with contextlib.suppress(FileNotFoundError):
        side.unlink()
    atomic_torch_save(flat, out)
    atomic_save_json(side, meta)
    return out, side


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike,
                      dtype: Optional[torch.dtype] = None) -> dict:
    """Export the backbone of a training checkpoint; returns the sidecar dict."""
    sd, cfg, step, ckpt = read_train_checkpoint(checkpoint)
    from mlcd_train.models import model_config_to_dict

    model = build_and_load(cfg, sd, str(ckpt))  # proves the weights fit the config before writing
    cfg = model_config_to_dict(model)
    ordered = {k: sd[k] for k in model.state_dict()}
    save_native(ordered, cfg, out, source=str(ckpt), step=step, dtype=dtype)
    return load_json(sidecar_path(out))


EPILOG = """examples:
  mlcd export --checkpoint runs/b32 --out b32.pt            # newest complete checkpoint of the run
  mlcd export --checkpoint runs/b32/checkpoints/step_00010000 --out b32_10k.pt --dtype bfloat16
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlcd export",
        description=textwrap.fill("Export the vision backbone of an mlcd training checkpoint as a flat native state dict "
                    "(X.pt, loadable with torch.load(weights_only=True)) plus a JSON sidecar X.json naming "
                    "the model config and image size. RoPE2D towers use the native MLCD layout that the "
                    "public Hugging Face conversion script reads; CLIP-style towers use open_clip's names.", 100),
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("--checkpoint", required=True,
                   help="a trainer checkpoint file (OUT/checkpoints/step_XXXXXXXX/model.pt), a step folder, "
                        "or a run's output folder (its newest complete checkpoint, i.e. with meta.json)")
    p.add_argument("--out", required=True, help="output file X.pt; the sidecar is written as X.json")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="cast floating tensors to this dtype (default: keep the checkpoint's dtype)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    meta = export_checkpoint(args.checkpoint, args.out, DTYPES[args.dtype] if args.dtype else None)
    cfg = meta["model_config"]
    print(f"exported {describe(cfg)} from {meta['source']} (step {meta['step']}) to {args.out} "
          f"and {sidecar_path(args.out)}")
    return 0


if __name__ == "__main__":
    from mlcd_train.cli import run_stage

    sys.exit(run_stage("export", sys.argv[1:]))
