"""``mlcd export``: the backbone of a training checkpoint as a flat native state dict.

    mlcd export --checkpoint OUT --out mlcd_vit.pt

``--checkpoint`` is a trainer checkpoint file (``OUT/checkpoints/step_XXXXXXXX/model.pt``), a
step folder, or a run's output folder (its newest complete checkpoint: the highest
``step_*`` folder that has ``meta.json``).  A ``train.parallel=fsdp`` checkpoint has a
``model_dcp/`` folder instead of ``model.pt``: its shards are read into one full state dict
on one process (no process group), the config from the folder's ``meta.json``; the export
is the same file a DDP run of the same weights gives.  Writes, each atomically:

- ``X.pt``: the flat backbone state dict (tensors only, no ``module.`` / ``_orig_mod.``
  prefixes), loadable with ``torch.load(X, weights_only=True)``.  RoPE2D towers use the
  native layout the public conversion script reads; CLIP-style towers use open_clip's names.
- ``X.json``: ``{"model_config": {...}, "image_size": N, "source": ..., "step": n}``.

Python: :func:`export` (what the command runs), :func:`export_checkpoint`, :func:`load_native`
(state dict + sidecar),
:func:`load_model` (our model from an export, the sidecar or the tensors telling its shape).
"""
from __future__ import annotations

import argparse
import contextlib
import textwrap
import os
import sys
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mlcd_core.errors import MLCDError
from mlcd_core.io import check_out_separate, load_json, safe_torch_load, tmp_path_for
from mlcd_train.trainer.checkpoint import STEP_RE, latest_complete

PREFIXES = ("module.", "_orig_mod.")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_STEP_RE = STEP_RE  # the trainer's step-folder pattern (trainer/checkpoint.py)


# --------------------------------------------------------------------------- reading
def torch_load(path: str | os.PathLike) -> object:
    """``torch.load(weights_only=True)`` on CPU of a regular file; unreadable, truncated or
    unsafe files are MLCDErrors naming the file."""
    return safe_torch_load(path, "torch checkpoint")


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


SHARDED = "model_dcp"  # train.parallel=fsdp: the backbone as a torch.distributed.checkpoint folder


def _model_in(folder: Path) -> Optional[Path]:
    """The backbone of a checkpoint folder: ``model.pt``, else an fsdp run's ``model_dcp/``."""
    if (folder / "model.pt").is_file():
        return folder / "model.pt"
    if (folder / SHARDED).is_dir():
        return folder / SHARDED
    return None


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The ``model.pt`` (or, for a ``train.parallel=fsdp`` run, the ``model_dcp`` folder) that
    ``path`` names: a file, a step folder, a checkpoints folder or a run folder."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise MLCDError(f"{path}: no such checkpoint file or folder")
    if path.name == SHARDED and path.is_dir():
        if not (path.parent / "meta.json").is_file():
            raise MLCDError(f"{path.parent}: checkpoint is incomplete (no meta.json)")
        return path
    if _model_in(path) is not None and not _STEP_RE.match(path.name):  # OUT/best, or a copied checkpoint folder
        if not (path / "meta.json").is_file():
            raise MLCDError(f"{path}: checkpoint is incomplete (no meta.json)")
        return _model_in(path)
    if _STEP_RE.match(path.name):
        if not (path / "meta.json").is_file():
            raise MLCDError(f"{path}: checkpoint is incomplete (no meta.json); pick an earlier step or the run folder")
        if _model_in(path) is None:
            raise MLCDError(f"{path}: complete checkpoint folder without model.pt")
        return _model_in(path)
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    step_dir = latest_complete(folder)  # the trainer's own listing: one pattern, one rule
    if step_dir is None:
        raise MLCDError(f"{path}: no complete checkpoint (no {folder.name}/step_*/meta.json)")
    if _model_in(step_dir) is None:
        raise MLCDError(f"{step_dir}: complete checkpoint folder without model.pt")
    return _model_in(step_dir)


def read_sharded_checkpoint(dcp_dir: Path) -> tuple[dict, dict, Optional[int], Path]:
    """An fsdp checkpoint's backbone (``model_dcp/``) as one full state dict, on one process and
    without a process group: the model_config and step come from the folder's ``meta.json``,
    the tensors are read into a plain model's state dict of that config (DCP reshards them)."""
    from mlcd_train.models import create_model_from_config
    from mlcd_train.trainer.parallel import read_full_state_dict

    meta_path = dcp_dir.parent / "meta.json"
    meta = load_json(meta_path, expect=dict)
    cfg = meta.get("model_config")
    if not isinstance(cfg, dict):
        raise MLCDError(f"{meta_path}: no 'model_config' dict beside the sharded checkpoint {dcp_dir.name}/")
    step = meta.get("step")
    if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
        raise MLCDError(f"{meta_path}: key 'step' should be int, found {type(step).__name__}")
    try:
        template = create_model_from_config(dict(cfg)).state_dict()
    except (MLCDError, TypeError, ValueError, KeyError) as exc:
        raise MLCDError(f"{meta_path}: 'model_config' does not describe a tower ({exc})") from None
    return read_full_state_dict(dcp_dir, template), dict(cfg), step, dcp_dir


def read_train_checkpoint(path: str | os.PathLike) -> tuple[dict, dict, Optional[int], Path]:
    """(backbone state dict without prefixes, model_config dict, step, model.pt path).

    For a ``train.parallel=fsdp`` checkpoint the path is its ``model_dcp`` folder."""
    ckpt = find_checkpoint(path)
    if ckpt.is_dir():
        return read_sharded_checkpoint(ckpt)
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
    meta = load_json(side, expect=dict) if side.exists() else None
    if meta is not None:
        check_sidecar(meta, side)
    if meta is not None and meta.get(SHA_KEY) is not None and meta[SHA_KEY] != file_sha256(path):
        # a re-export killed between its two renames: new weights beside the old config
        raise MLCDError(f"{side}: sidecar belongs to another {Path(path).name} (its {SHA_KEY} does not match the "
                        f"file's content); export again, or delete {side.name} and pass --num_heads / --act / "
                        "--image_size")
    return sd, meta


SHA_KEY = "pt_sha256"  # the sidecar's record of the .pt it describes
MAX_CONFIG_INT = 1 << 20  # no tower setting (width, layers, image size, ...) comes near it


def check_sidecar(meta: dict, side: str | os.PathLike) -> None:
    """The sidecar's ``model_config`` must describe a tower (the model registry's checks, and
    every number finite and below MAX_CONFIG_INT, so that a damaged file cannot ask for an
    impossible allocation); ``image_size`` / ``step`` integers or null; ``source`` and
    ``pt_sha256`` strings.  Anything else is an MLCDError naming the file and the key."""
    import math

    from mlcd_train.models.registry import config_from_dict
    from mlcd_train.utils.io import json_field

    cfg = json_field(meta, "model_config", dict, side)
    for key in ("image_size", "step"):
        json_field(meta, key, int, side, default=None, nullable=True)
    for key in ("source", SHA_KEY):
        json_field(meta, key, str, side, default=None, nullable=True)
    for key, value in cfg.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if abs(value) > MAX_CONFIG_INT or not math.isfinite(value):  # (10**400 > N before isfinite overflows)
            raise MLCDError(f"{side}: key 'model_config.{key}' = {str(value)[:40]} is out of range")
    try:
        config_from_dict(dict(cfg), where=f"{side}: key 'model_config'")
    except MLCDError as exc:
        msg = str(exc)
        raise MLCDError(msg if str(side) in msg else f"{side}: key 'model_config': {msg}") from None
    except (TypeError, ValueError, OverflowError, AttributeError) as exc:
        raise MLCDError(f"{side}: key 'model_config' does not describe a tower ({str(exc)[:200]})") from None


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def infer_config(state_dict: dict, where: str = "checkpoint", *, image_size: Optional[int] = None,
                 heads: Optional[int] = None, act: Optional[str] = None, name: str = "custom") -> dict:
    """Model config dict read off the tensors of a native state dict.

    Width, depth, patch and MLP size from the weights; RoPE2D when ``class_pos_emb`` is
    there (heads = width / (2 * its length)), else learned absolute positions (image size
    from the position table, heads = width / 64 as in CLIP); activation ``gelu`` (a guess, which
    :func:`resolve_config` never makes: without sidecar it needs ``act``).  Arguments
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
    if cfg["pos_embed"] == "abs" and (heads is None or act is None):
        # heads and activation are not in the tensors, and the conversion check cannot catch a
        # wrong guess (both sides are built from it): an abs tower without sidecar needs both
        missing = " and ".join(f for f, v in (("--num_heads", heads), ("--act", act)) if v is None)
        raise MLCDError(f"{where}: no .json sidecar ({sidecar_path(where).name}), and a learned-position tower's "
                        f"heads and activation are not in its tensors; pass {missing} (e.g. --num_heads "
                        f"{cfg['heads']} --act gelu for a CLIP-style tower of width {cfg['width']}), or keep the "
                        "sidecar of mlcd export beside it")
    if act is None:
        # RoPE2D: heads come from class_pos_emb, but the activation is in no tensor, and the
        # conversion check cannot catch a wrong guess (both sides are built from it)
        raise MLCDError(f"{where}: no .json sidecar ({sidecar_path(where).name}), and a RoPE2D tower's activation "
                        "is not in its tensors; pass --act gelu (the native MLCD layout's, e.g. DeepGlint's "
                        "checkpoints) or --act quick_gelu (act= in Python), or keep the sidecar of mlcd export "
                        "beside it")
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
    side = sidecar_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # both files are written to temporaries first, then renamed .pt then .json: a failure
    # while writing leaves the previous pair as it was, and a kill between the two renames
    # leaves new weights beside the old sidecar, which load_native refuses (the sidecar
    # records the sha256 of its .pt) instead of building the model with the old config
    tmp_pt, tmp_side = tmp_path_for(out), tmp_path_for(side)
    try:
        _write_synced(tmp_pt, lambda f: torch.save(flat, f))
        meta = {"model_config": dict(model_config), "image_size": int(model_config["image_size"]),
                "source": str(source), "step": step, SHA_KEY: file_sha256(tmp_pt)}
        _write_synced(tmp_side, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))
        os.replace(tmp_pt, out)
        os.replace(tmp_side, side)
    finally:
        for tmp in (tmp_pt, tmp_side):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return out, side


def _write_synced(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike,
                      dtype: Optional[torch.dtype] = None) -> dict:
    """Export the backbone of a training checkpoint; returns the sidecar dict."""
    sd, cfg, step, ckpt = read_train_checkpoint(checkpoint)
    from mlcd_train.models import model_config_to_dict

    model = build_and_load(cfg, sd, str(ckpt))  # proves the weights fit the config before writing
    cfg = model_config_to_dict(model)
    ordered = {k: sd[k] for k in model.state_dict()}
    save_native(ordered, cfg, out, source=str(ckpt), step=step, dtype=dtype)
    return load_json(sidecar_path(out), expect=dict)


EPILOG = """examples:
  mlcd export --checkpoint runs/b32 --out b32.pt            # newest complete checkpoint of the run
  mlcd export --checkpoint runs/b32/checkpoints/step_00010000 --out b32_10k.pt --dtype bfloat16
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlcd export",
        description=textwrap.fill("Export the vision backbone of an mlcd training checkpoint as a flat native state "
                    "dict "
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


@dataclass
class ExportResult:
    """What :func:`export` returns: the export ``pt`` (``X.pt``), its ``sidecar`` (``X.json``) and
    the sidecar's content ``meta`` (model_config, image_size, source, step, pt_sha256)."""

    pt: Path
    sidecar: Path
    meta: dict


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, *,
           dtype: str | torch.dtype | None = None) -> ExportResult:
    """``mlcd export``: the backbone of a training checkpoint (a ``model.pt``, a step folder, or a
    run folder: its newest complete checkpoint) as the flat native state dict ``out`` (``X.pt``)
    plus its sidecar ``X.json``; ``dtype`` ("float32", "bfloat16", "float16" or a torch dtype)
    casts floating tensors.  One export at a time into ``out`` (a lock beside it).  Bad input is
    an :class:`~mlcd_core.errors.MLCDError` naming the file."""
    from mlcd_core.lock import output_lock

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise MLCDError(f"--dtype {dtype!r}: use one of {', '.join(sorted(DTYPES))}")
        dtype = DTYPES[dtype]
    check_out_separate("--out", out, [("--checkpoint", checkpoint)], out_is_file=True)
    with output_lock(out, "export", beside=True):  # one export at a time into X.pt / X.json
        meta = export_checkpoint(checkpoint, out, dtype)
    return ExportResult(Path(out), sidecar_path(out), meta)


def main(argv: list[str] | None = None) -> int:
    """``mlcd export``'s command line: the flags of :func:`build_parser` -> :func:`export`."""
    args = build_parser().parse_args(argv)
    meta = export(args.checkpoint, args.out, dtype=args.dtype).meta
    cfg = meta["model_config"]
    print(f"exported {describe(cfg)} from {meta['source']} (step {meta['step']}) to {args.out} "
          f"and {sidecar_path(args.out)}")
    return 0


if __name__ == "__main__":
    from mlcd_core.stage import run_main
    from mlcd_train import export as _stage  # the module under its own name, as `mlcd export` runs it

    sys.exit(run_main("export", _stage.main, sys.argv[1:]))
