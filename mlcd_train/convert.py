"""``mlcd convert``: native export -> Hugging Face directory, and back.

Export to Hugging Face (the seed's flags)::

    mlcd convert --checkpoint_path mlcd_vit.pt --pytorch_dump_folder_path hf_dir --image_size 336

The architecture comes from the export's ``.json`` sidecar when present (refused when it
records another ``.pt``'s sha256), else from the tensors (width, depth, patch, MLP size;
RoPE2D when ``class_pos_emb`` is there, heads from its length; no activation is in the
tensors, so without sidecar ``--act`` is required (``gelu`` for DeepGlint's native layout),
and for a learned-position tower ``--num_heads`` too); the flags override.  RoPE2D towers become a
``transformers.MLCDVisionModel`` directory, CLIP-style towers a ``CLIPVisionModel`` (or
``CLIPVisionModelWithProjection`` when the tower has a projection); weights in safetensors
under the ``vision_model.`` prefix (``vision_model.class_pos_emb`` for RoPE2D), the layout of
DeepGlint's own folders, which transformers 4.x and 5.x both load (5.x's own save_pretrained
drops the prefix, and 4.x then builds random weights with only a warning), plus a
``CLIPImageProcessor`` config (bicubic resize of the short side, centre crop, CLIP
mean/std).  A RoPE2D tower's projection, which MLCDVisionModel has no place for, is kept in
``mlcd_projection.safetensors`` (key ``proj``, [width, dim]) so that import restores it.

After writing, the directory is loaded back with transformers (safetensors only, every key
present and used, else an error) and run on a fixed random
input next to our model: the class token's cosine must exceed 0.9999 at every layer and
the last hidden state must agree within 1e-4 (max |diff| relative to max(1, max |value|)).
Otherwise the command fails naming the first layer that diverges.  Everything is written
in a temporary folder beside the target and renamed at the end: no partial output folder.

Import (Hugging Face MLCD or CLIP vision directory -> our native export)::

    mlcd convert --from-hf hf_dir --out mlcd_vit.pt

The weights are read by us, not by ``from_pretrained``: safetensors (one file or an index of
shards, whose names must stay in the folder), else ``pytorch_model.bin`` with
``torch.load(weights_only=True)``; both layouts (with or without ``vision_model.``, and
``class_pos_emb`` either way) are accepted, a missing tensor is an error naming it.

Python: :func:`convert_to_hf`, :func:`import_from_hf` (returns our model), :func:`load_hf` (a
transformers model from a folder, checked complete), :func:`hf_outputs`, :func:`verify_against`,
:func:`native_to_hf_state_dict`, :func:`hf_to_native_state_dict`.
"""
from __future__ import annotations

import argparse
import textwrap
import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from mlcd_train.export import build_and_load, load_native, resolve_config, save_native
from mlcd_train.utils.errors import MLCDError
from mlcd_train.utils.args import positive_int
from mlcd_train.utils.io import check_name, check_out_separate, check_regular, json_field, load_json, safe_torch_load
from mlcd_train.utils.lock import output_lock

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROJ_FILE = "mlcd_projection.safetensors"
COS_MIN = 0.9999
ATOL = 1e-4
FILE_PREFIX = "vision_model."  # where the tower sits in the weights we write (4.x and 5.x load it)
WEIGHTS = "model.safetensors"

# per-block native suffix -> HF suffix (weights and biases)
_BLOCK_MAP = [("ln_1", "layer_norm1"), ("attn.out_proj", "self_attn.out_proj"), ("ln_2", "layer_norm2"),
              ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]


def hf_prefix(keys) -> str:
    """Where the tower's modules sit in a transformers state dict: ``vision_model.`` in
    transformers 4.x models, DeepGlint's folders, the files we write and every
    CLIPVisionModelWithProjection / CLIPModel; nothing in transformers 5's MLCDVisionModel and
    CLIPVisionModel (and the folders their save_pretrained writes)."""
    for key in keys:
        if key.endswith("embeddings.patch_embedding.weight"):
            return key[: -len("embeddings.patch_embedding.weight")]
    raise MLCDError("Hugging Face weights: no '*embeddings.patch_embedding.weight' key; not a ViT vision tower")


def canonical_hf_state_dict(hf: dict) -> dict:
    """A transformers vision state dict in any layout -> the tower's keys without prefix
    (``embeddings.*``, ``encoder.*``, ``pre_layrnorm.*``, ``post_layernorm.*``, ``class_pos_emb``)
    plus ``visual_projection.weight``; a CLIPModel's text half and other keys are dropped.
    ``class_pos_emb`` is taken with or without the prefix (transformers 4.52-4.57 put it under
    ``vision_model.``, 5.x and earlier versions of this tool wrote it bare)."""
    p = hf_prefix(hf)
    out = {}
    for key, value in hf.items():
        if p and key.startswith(p):
            out[key[len(p):]] = value
        elif not p and not key.startswith(("text_model.", "text_projection", "logit_scale")):
            out[key] = value
        elif key in ("visual_projection.weight", "class_pos_emb"):
            out[key] = value
    return out


def to_model_layout(canon: dict, model_keys) -> dict:
    """Canonical keys (:func:`canonical_hf_state_dict`) -> the keys of a transformers model
    whose state dict has ``model_keys`` (its own prefix)."""
    p = hf_prefix(model_keys)
    return {k if k == "visual_projection.weight" else p + k: v for k, v in canon.items()}


# --------------------------------------------------------------------------- state dict maps
def native_to_hf_state_dict(sd: dict, cfg: dict, prefix: str = "") -> dict:
    """Our native state dict -> the state dict of a transformers model whose tower modules sit
    under ``prefix`` (see :func:`hf_prefix`; ``class_pos_emb`` too).  A RoPE2D tower's ``proj``
    is left out (MLCDVisionModel has none); a CLIP-style one becomes ``visual_projection.weight``."""
    rope = cfg["pos_embed"] == "rope2d"
    D = cfg["width"]
    p = prefix
    out = {
        p + "embeddings.patch_embedding.weight": sd["conv1.weight"],
        p + "embeddings.class_embedding": sd["class_embedding"],
        p + "pre_layrnorm.weight": sd["ln_pre.weight"], p + "pre_layrnorm.bias": sd["ln_pre.bias"],
        p + "post_layernorm.weight": sd["ln_post.weight"], p + "post_layernorm.bias": sd["ln_post.bias"],
    }
    if rope:
        out[p + "class_pos_emb"] = sd["class_pos_emb"]
    else:
        out[p + "embeddings.position_embedding.weight"] = sd["positional_embedding"]
        if sd.get("proj") is not None:
            out["visual_projection.weight"] = sd["proj"].t()
    for i in range(cfg["layers"]):
        src, dst = f"transformer.resblocks.{i}.", f"{p}encoder.layers.{i}."
        w_key, b_key = ("attn.in_proj.weight", "attn.in_proj.bias") if rope else \
            ("attn.in_proj_weight", "attn.in_proj_bias")
        w, b = sd[src + w_key], sd[src + b_key]
        for j, name in enumerate("qkv"):
            out[f"{dst}self_attn.{name}_proj.weight"] = w[j * D:(j + 1) * D]
            out[f"{dst}self_attn.{name}_proj.bias"] = b[j * D:(j + 1) * D]
        for a, h in _BLOCK_MAP:
            for s in ("weight", "bias"):
                out[f"{dst}{h}.{s}"] = sd[f"{src}{a}.{s}"]
    return {k: v.contiguous() for k, v in out.items()}


def hf_to_native_state_dict(hf: dict, cfg: dict) -> dict:
    """The reverse of :func:`native_to_hf_state_dict` (``proj`` from ``visual_projection`` if
    present), from a state dict in any layout (:func:`canonical_hf_state_dict`)."""
    rope = cfg["pos_embed"] == "rope2d"
    hf = canonical_hf_state_dict(hf)
    p = ""

    def get(key):
        if key not in hf:
            raise MLCDError(f"Hugging Face weights: missing key {key!r}")
        return hf[key]

    out = {
        "conv1.weight": get(p + "embeddings.patch_embedding.weight"),
        "class_embedding": get(p + "embeddings.class_embedding"),
        "ln_pre.weight": get(p + "pre_layrnorm.weight"), "ln_pre.bias": get(p + "pre_layrnorm.bias"),
    }
    if rope:
        out["class_pos_emb"] = get("class_pos_emb")
    else:
        out["positional_embedding"] = get(p + "embeddings.position_embedding.weight")
    for i in range(cfg["layers"]):
        src, dst = f"{p}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        w_key, b_key = ("attn.in_proj.weight", "attn.in_proj.bias") if rope else \
            ("attn.in_proj_weight", "attn.in_proj_bias")
        out[dst + w_key] = torch.cat([get(f"{src}self_attn.{n}_proj.weight") for n in "qkv"], dim=0)
        out[dst + b_key] = torch.cat([get(f"{src}self_attn.{n}_proj.bias") for n in "qkv"], dim=0)
        for a, h in _BLOCK_MAP:
            for s in ("weight", "bias"):
                out[f"{dst}{a}.{s}"] = get(f"{src}{h}.{s}")
    out["ln_post.weight"] = get(p + "post_layernorm.weight")
    out["ln_post.bias"] = get(p + "post_layernorm.bias")
    if "visual_projection.weight" in hf:
        out["proj"] = hf["visual_projection.weight"].t()
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


# --------------------------------------------------------------------------- HF models
def hf_config_for(cfg: dict):
    """The transformers config (MLCDVisionConfig or CLIPVisionConfig) of our model config."""
    common = dict(hidden_size=cfg["width"], intermediate_size=int(round(cfg["width"] * cfg["mlp_ratio"])),
                  num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"], num_channels=3,
                  image_size=cfg["image_size"], patch_size=cfg["patch_size"], hidden_act=cfg["act"],
                  layer_norm_eps=1e-5)
    if cfg["pos_embed"] == "rope2d":
        from transformers import MLCDVisionConfig

        hc = MLCDVisionConfig(**common)
        hc.architectures = ["MLCDVisionModel"]
    else:
        from transformers import CLIPVisionConfig

        hc = CLIPVisionConfig(projection_dim=cfg.get("output_dim") or 512, **common)
        hc.architectures = ["CLIPVisionModelWithProjection" if cfg.get("output_dim") else "CLIPVisionModel"]
    return hc


def hf_class_for(cfg: dict):
    import transformers

    if cfg["pos_embed"] == "rope2d":
        return transformers.MLCDVisionModel
    return transformers.CLIPVisionModelWithProjection if cfg.get("output_dim") else transformers.CLIPVisionModel


def image_processor_for(image_size: int):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": image_size}, resample=3,  # PIL bicubic
                              do_center_crop=True, crop_size={"height": image_size, "width": image_size},
                              do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)


def _hf_outputs(hf_model, pixels: torch.Tensor, with_proj: bool):
    out = hf_model(pixel_values=pixels, output_hidden_states=True)
    if with_proj and getattr(out, "image_embeds", None) is not None:
        pooled = out.image_embeds
    elif getattr(out, "pooler_output", None) is not None:
        pooled = out.pooler_output
    else:  # CLIPVisionModelWithProjection of a tower without projection: ln_post of the class token
        pooled = hf_model.vision_model.post_layernorm(out.last_hidden_state[:, 0])
    return list(out.hidden_states), pooled


def compare_outputs(ours_states: list, ours_pooled: torch.Tensor, hf_states: list, hf_pooled: torch.Tensor,
                    where: str) -> dict:
    """Raise MLCDError at the first layer whose class-token cosine is <= 0.9999, or when the last
    hidden state or the pooled output differ by more than 1e-4 (relative to max(1, max |value|))."""
    if len(ours_states) != len(hf_states):
        raise MLCDError(f"{where}: {len(hf_states)} hidden states from transformers, {len(ours_states)} from ours")
    worst = 1.0
    for i, (a, b) in enumerate(zip(ours_states, hf_states)):
        cos = torch.nn.functional.cosine_similarity(a[:, 0].double(), b[:, 0].double(), dim=-1).min().item()
        worst = min(worst, cos)
        if not cos > COS_MIN:
            label = "the embeddings (input of layer 0)" if i == 0 else f"layer {i - 1} (hidden state {i})"
            raise MLCDError(f"{where}: outputs diverge at {label}: class-token cosine {cos:.6f} <= {COS_MIN}")

    def rel(a, b):
        return ((a.double() - b.double()).abs().max() / max(1.0, b.double().abs().max().item())).item()

    last = rel(ours_states[-1], hf_states[-1])
    if not last <= ATOL:
        raise MLCDError(f"{where}: last hidden state differs by {last:.3g} (> {ATOL}) although every "
                        f"class-token cosine is above {COS_MIN}")
    pooled = rel(ours_pooled, hf_pooled)
    if not pooled <= ATOL:
        raise MLCDError(f"{where}: pooled output differs by {pooled:.3g} (> {ATOL})")
    return {"min_cls_cosine": worst, "last_hidden_max_rel_diff": last, "pooled_max_rel_diff": pooled}


def _say(msg: str) -> None:
    if os.environ.get("MLCD_QUIET", "0") != "1":
        print(f"mlcd convert: {msg}", file=sys.stderr, flush=True)


def verify_against(model, hf_model, image_size: int, where: str, *, height: Optional[int] = None,
                   width: Optional[int] = None, seed: int = 0, pixels: Optional[torch.Tensor] = None) -> dict:
    """Run our model and a transformers model on the same input and compare: ``pixels``
    [B, 3, H, W] (e.g. real images, as ``mlcd demo`` does), else a fixed random batch."""
    if pixels is None:
        g = torch.Generator().manual_seed(seed)
        batch = 2 if sum(p.numel() for p in model.parameters()) < 100_000_000 else 1  # bigG on CPU: one image
        pixels = torch.randn(batch, 3, height or image_size, width or image_size, generator=g)
    with torch.no_grad():
        ours = model.float().eval().forward_hidden_states(pixels)
        ours_pooled = model._pool(ours[-1])
        hf_states, hf_pooled = _hf_outputs(hf_model.float().eval(), pixels, model.proj is not None)
    if model.proj is not None and model.config.pos_embed == "rope2d":
        hf_pooled = hf_pooled @ model.proj  # MLCDVisionModel has no projection; compare after ours
    return compare_outputs(ours, ours_pooled, hf_states, hf_pooled, where)


# --------------------------------------------------------------------------- folders
def _tmp_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.{os.getpid()}.tmp"


def _publish_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` folder to ``out`` (replacing it only when ``overwrite``)."""
    if out.exists():
        if not overwrite:
            raise MLCDError(f"{out}: already exists; pass --overwrite to replace it")
        old = out.parent / f".{out.name}.{os.getpid()}.old"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _tf_version() -> str:
    import transformers

    return transformers.__version__


def _dtype_kwargs() -> dict:
    """float32 weights on load: transformers 5 calls the argument ``dtype``, 4.x ``torch_dtype``
    (4.56+ takes both); 5.x's default is the file's dtype."""
    major = int(_tf_version().split(".")[0])
    return {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}


def _loading_problems(info: dict) -> str:
    parts = []
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        found = sorted(str(k) for k in (info.get(key) or ()))
        if found:
            parts.append(f"{key.replace('_', ' ')} {found[:4]}{' ...' if len(found) > 4 else ''}")
    return "; ".join(parts)


def load_hf(hf_dir: str | os.PathLike, hf_cls=None, *, strict: bool = True):
    """A transformers model from a folder we wrote (class from its config's ``architectures``
    unless ``hf_cls``): safetensors only (nothing unpickled), float32, offline.  With ``strict``,
    a key transformers leaves missing or unused (which it would fill with random weights, with
    only a warning) is an MLCDError naming the folder and the transformers version."""
    import transformers

    hf_dir = Path(hf_dir)
    if hf_cls is None:
        cfg_path = hf_dir / "config.json"
        raw = _read_hf_config(hf_dir)
        archs = json_field(raw, "architectures", list, cfg_path, default=None, nullable=True) or ["AutoModel"]
        hf_cls = getattr(transformers, str(archs[0]), None)
        if hf_cls is None or not hasattr(hf_cls, "from_pretrained"):
            raise MLCDError(f"{cfg_path}: architecture {str(archs[0])[:60]!r} is not a transformers model class "
                            f"(transformers {_tf_version()})")
    try:
        with _quiet_transformers():
            model, info = hf_cls.from_pretrained(hf_dir, use_safetensors=True, local_files_only=True,
                                                 output_loading_info=True, **_dtype_kwargs())
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MLCDError(f"{hf_dir}: transformers {_tf_version()} cannot load it as {hf_cls.__name__} "
                        f"(safetensors weights only): {first[:300]}") from None
    problems = _loading_problems(info)
    if strict and problems:
        raise MLCDError(f"{hf_dir}: transformers {_tf_version()} loads it as {hf_cls.__name__} with {problems} "
                        "(those weights would be random)")
    return model.float().eval()


def hf_outputs(hf_model, pixels: torch.Tensor, with_proj: bool):
    """(hidden states, pooled output) of a transformers vision model, as :func:`verify_against`
    compares them with ours."""
    return _hf_outputs(hf_model, pixels, with_proj)


def convert_to_hf(checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                  image_size: Optional[int] = None, num_heads: Optional[int] = None, act: Optional[str] = None,
                  overwrite: bool = False, verify: bool = True) -> dict:
    """Write a Hugging Face directory for a native export; returns the report (config, checks).

    The output (a folder replaced as a whole) is locked for the conversion: a second
    conversion into it is refused naming this one (mlcd_train/utils/lock.py)."""
    out = Path(out_dir)
    # the output folder is replaced as a whole (--overwrite): it must not hold the export
    check_out_separate("--pytorch_dump_folder_path", out,
                       [("--checkpoint_path", checkpoint_path),
                        ("--checkpoint_path", Path(checkpoint_path).with_suffix(".json"))], replaces_out=True)
    if out.exists() and not overwrite:
        raise MLCDError(f"{out}: already exists; pass --overwrite to replace it")
    with output_lock(out, "convert", beside=True):
        return _convert_to_hf(checkpoint_path, out, image_size, num_heads, act, overwrite, verify)


def _convert_to_hf(checkpoint_path, out: Path, image_size, num_heads, act, overwrite: bool, verify: bool) -> dict:
    sd, meta = load_native(checkpoint_path)
    cfg = resolve_config(sd, meta, str(checkpoint_path), image_size=image_size, heads=num_heads, act=act)
    if cfg.get("family", "vit") != "vit":
        raise MLCDError(f"{checkpoint_path}: a {cfg.get('family')} export; the Hugging Face conversion is for ViTs "
                        "(a ResNet export is timm's own state dict: see the README, 'Loading a ResNet export')")
    model = build_and_load(cfg, sd, str(checkpoint_path))  # fp32 copy of the (possibly bf16) weights
    dtype = next(iter(sd.values())).dtype  # the HF weights keep the export's precision
    del sd
    cfg = dict(vars(model.config))
    hf_cls = hf_class_for(cfg)
    _say(f"writing {hf_cls.__name__} ({cfg['pos_embed']}, width {cfg['width']}, {cfg['layers']} layers)")
    # written by us, not by save_pretrained: transformers 5 would drop the vision_model. prefix
    weights = {k: v.detach().to(dtype).contiguous()
               for k, v in native_to_hf_state_dict(model.state_dict(), cfg, FILE_PREFIX).items()}
    hc = hf_config_for(cfg)

    tmp = _tmp_dir_for(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        from safetensors.torch import save_file

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        hc.save_pretrained(tmp)
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
        del weights
        image_processor_for(cfg["image_size"]).save_pretrained(tmp)
        if cfg["pos_embed"] == "rope2d" and model.proj is not None:
            save_file({"proj": model.proj.detach().to(dtype).contiguous()}, str(tmp / PROJ_FILE))
        report = {"model_config": cfg, "hf_class": hf_cls.__name__}
        if verify:
            _say(f"reloading {tmp} with transformers {_tf_version()} and comparing every layer")
            loaded = load_hf(tmp, hf_cls)
            report["checks"] = verify_against(model, loaded, cfg["image_size"], f"{out} vs {checkpoint_path}")
            del loaded
        _publish_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _read_hf_config(hf_dir: Path) -> dict:
    cfg_path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise MLCDError(f"{hf_dir}: not a folder (a Hugging Face model folder holds config.json and the weights)")
    if not cfg_path.exists():
        raise MLCDError(f"{hf_dir}: not a Hugging Face model folder (no config.json)")
    return load_json(cfg_path, expect=dict)


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # transformers 5's "Loading weights" bar
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        check_regular(path, what="safetensors file")
        return load_file(str(path))
    except FileNotFoundError:
        raise MLCDError(f"{path}: not found") from None
    except MLCDError:
        raise
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MLCDError(f"{path}: not a readable safetensors file ({first[:200]})") from None


def read_hf_weights(hf_dir: str | os.PathLike) -> dict:
    """The tensors of a Hugging Face folder, read without running code: ``model.safetensors``,
    else the shards named by ``model.safetensors.index.json`` (plain file names in the folder),
    else ``pytorch_model.bin`` with ``torch.load(weights_only=True)`` (a pickled object in it
    is refused, naming the file)."""
    hf_dir = Path(hf_dir)
    single, index, pickled = hf_dir / WEIGHTS, hf_dir / "model.safetensors.index.json", hf_dir / "pytorch_model.bin"
    if single.exists():
        return _load_safetensors(single)
    if index.exists():
        wmap = json_field(load_json(index, expect=dict), "weight_map", dict, index)
        out: dict = {}
        for name in sorted({check_name(f, index, "weight file") for f in wmap.values()}):
            out.update(_load_safetensors(hf_dir / name))
        missing = sorted(set(wmap) - set(out))
        if missing:
            raise MLCDError(f"{index}: names tensors its shards do not hold: {missing[:4]}")
        return out
    if pickled.exists():
        obj = safe_torch_load(pickled, "pytorch_model.bin")
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise MLCDError(f"{pickled}: not a state dict of tensors")
        return obj
    raise MLCDError(f"{hf_dir}: no weights ({WEIGHTS}, model.safetensors.index.json or pytorch_model.bin)")


MAX_HF_SIZE = 1 << 20  # no vision tower setting comes near it: a larger one is a damaged file


def _check_size(v, key: str, cfg_path: Path) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= MAX_HF_SIZE:
        raise MLCDError(f"{cfg_path}: {key} should be a positive integer up to {MAX_HF_SIZE}, found "
                        f"{str(v)[:40]!r}")


def import_from_hf(hf_dir: str | os.PathLike, *, verify: bool = True, name: Optional[str] = None):
    """Our VisionTransformer from a Hugging Face MLCD or CLIP vision directory (returns the model),
    in either layout (with or without ``vision_model.``; see :func:`canonical_hf_state_dict`)."""
    import transformers

    hf_dir = Path(hf_dir)
    raw = _read_hf_config(hf_dir)
    cfg_path = hf_dir / "config.json"
    model_type = json_field(raw, "model_type", str, cfg_path, default=None, nullable=True)
    if model_type == "mlcd_vision_model":
        config_cls, pos_embed = transformers.MLCDVisionConfig, "rope2d"
    elif model_type in ("clip_vision_model", "clip"):
        config_cls, pos_embed = transformers.CLIPVisionConfig, "abs"
    else:
        raise MLCDError(f"{cfg_path}: model_type {model_type!r} is not an MLCD or CLIP vision model "
                        f"(expected 'mlcd_vision_model', 'clip_vision_model' or 'clip')")
    try:
        with _quiet_transformers():  # a full CLIP config: its vision half
            hc = config_cls.from_pretrained(hf_dir, local_files_only=True)
    except Exception as exc:  # a data file: any failure to read it is the file's (huggingface_hub's
        # strict dataclasses raise their own validation errors)
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise MLCDError(f"{cfg_path}: transformers {_tf_version()} cannot read it as {config_cls.__name__}: "
                        f"{first.strip()[:200]}") from None
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        _check_size(getattr(hc, key, None), key, cfg_path)
    for key in ("image_size", "patch_size"):
        for v in (getattr(hc, key, None) if isinstance(getattr(hc, key, None), (list, tuple))
                  else [getattr(hc, key, None)]):
            _check_size(v, key, cfg_path)
    if not isinstance(hc.layer_norm_eps, (int, float)) or isinstance(hc.layer_norm_eps, bool):
        raise MLCDError(f"{cfg_path}: layer_norm_eps should be a number, found {hc.layer_norm_eps!r}"[:200])
    weights = read_hf_weights(hf_dir)
    try:
        canon = canonical_hf_state_dict(weights)
    except MLCDError as exc:  # name the folder the weights came from
        raise MLCDError(f"{hf_dir}: {exc}") from None
    has_proj = pos_embed == "abs" and "visual_projection.weight" in canon
    if not has_proj:
        canon.pop("visual_projection.weight", None)
    if has_proj:
        hc.projection_dim = int(canon["visual_projection.weight"].shape[0])
    act = hc.hidden_act
    if act not in ("gelu", "quick_gelu"):
        raise MLCDError(f"{cfg_path}: hidden_act {act!r} is not supported (gelu or quick_gelu)")
    if abs(hc.layer_norm_eps - 1e-5) > 1e-12:
        raise MLCDError(f"{cfg_path}: layer_norm_eps {hc.layer_norm_eps} (the towers use 1e-5)")
    if getattr(hc, "num_key_value_groups", 1) != 1:
        raise MLCDError(f"{cfg_path}: num_key_value_groups {hc.num_key_value_groups} is not supported")

    def one(v, key):
        if isinstance(v, (list, tuple)):
            if len(set(v)) != 1:
                raise MLCDError(f"{cfg_path}: non-square {key} {v} is not supported")
            v = v[0]
        return int(v)

    proj = None
    if pos_embed == "rope2d" and (hf_dir / PROJ_FILE).exists():
        extra = _load_safetensors(hf_dir / PROJ_FILE)
        proj = extra.get("proj")
        if proj is None or proj.ndim != 2 or proj.shape[0] != hc.hidden_size:
            raise MLCDError(f"{hf_dir / PROJ_FILE}: expected a tensor 'proj' of shape [{hc.hidden_size}, dim]")
        proj = proj.float()
    output_dim = hc.projection_dim if has_proj else (int(proj.shape[1]) if proj is not None else None)
    cfg = dict(name=name or hf_dir.name, image_size=one(hc.image_size, "image_size"),
               patch_size=one(hc.patch_size, "patch_size"), width=hc.hidden_size, layers=hc.num_hidden_layers,
               heads=hc.num_attention_heads, mlp_ratio=hc.intermediate_size / hc.hidden_size,
               pos_embed=pos_embed, output_dim=output_dim, act=act)
    # a size the weights do not have is the config's (a key left out takes transformers'
    # default) or the weights': the message names both
    where = f"{cfg_path} against the weights in {hf_dir}"
    try:
        sd = hf_to_native_state_dict(canon, cfg)
        if proj is not None:
            sd["proj"] = proj
        model = build_and_load(cfg, sd, where)
    except MLCDError as exc:
        if str(exc).startswith(where):
            raise
        raise MLCDError(f"{where}: {exc}") from None
    if verify:
        # transformers' own module, given the file's tensors by name alone (not through our
        # mapping), so that a mistake in hf_to_native_state_dict shows as a divergence
        hf_cls = transformers.MLCDVisionModel if pos_embed == "rope2d" else (
            transformers.CLIPVisionModelWithProjection if has_proj else transformers.CLIPVisionModel)
        with _quiet_transformers():
            hf_model = hf_cls(hc)
        own = hf_model.state_dict()
        given = to_model_layout(canon, own)
        missing, unexpected = sorted(set(own) - set(given)), sorted(set(given) - set(own))
        if missing or unexpected:
            raise MLCDError(f"{hf_dir}: weights do not fit {hf_cls.__name__}: missing {missing[:4]}, "
                            f"unexpected {unexpected[:4]}")
        try:
            hf_model.load_state_dict({k: v.float() for k, v in given.items()}, strict=True)
        except RuntimeError as exc:
            raise MLCDError(f"{hf_dir}: weights do not fit {hf_cls.__name__}: "
                            f"{str(exc).strip().splitlines()[-1][:300]}") from None
        verify_against(model, hf_model.eval(), cfg["image_size"], f"import of {hf_dir}")
    return model


# --------------------------------------------------------------------------- CLI
EPILOG = """examples:
  mlcd convert --checkpoint_path mlcd_vit.pt --pytorch_dump_folder_path hf_dir
  python tools/convert_to_hf.py --checkpoint_path bigG.pt --pytorch_dump_folder_path hf_dir --image_size 336 --act gelu
  mlcd convert --from-hf mlcd-vit-bigG-patch14-336 --out bigG_336.pt
"""

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlcd convert",
        description=textwrap.fill("Convert a native MLCD export (mlcd export's X.pt, or a native RoPE2D checkpoint as "
                    "the public conversion script reads) into a Hugging Face directory: MLCDVisionModel for RoPE2D "
                    "towers, CLIPVisionModel / CLIPVisionModelWithProjection for learned absolute positions; "
                    "safetensors weights and a CLIPImageProcessor config. The written directory is reloaded "
                    "with transformers and checked against our model (class-token cosine > 0.9999 at every "
                    "layer, last hidden state within 1e-4); on failure nothing is left behind and the command "
                    "exits non-zero. With --from-hf DIR --out X.pt it imports a Hugging Face MLCD or CLIP "
                    "vision directory into our native format instead.", 100),
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("--checkpoint_path", "--checkpoint-path", help="native export X.pt (its X.json sidecar is used "
                   "when present) or an mlcd trainer checkpoint model.pt")
    p.add_argument("--pytorch_dump_folder_path", "--pytorch-dump-folder-path", "--out_dir",
                   help="Hugging Face output directory (written through a temporary folder)")
    p.add_argument("--image_size", "--image-size", type=positive_int, default=None,
                   help="input size in pixels; needed for a RoPE2D checkpoint without sidecar, must match the "
                        "position table for absolute positions (default: from the sidecar or the tensors)")
    p.add_argument("--num_heads", "--num-heads", type=positive_int, default=None,
                   help="attention heads (default: sidecar; RoPE2D: width / (2 * len(class_pos_emb)); "
                        "abs without sidecar: required)")
    p.add_argument("--act", choices=("gelu", "quick_gelu"), default=None,
                   help="MLP activation (default: the sidecar; without sidecar required: gelu for DeepGlint's "
                        "native RoPE2D checkpoints)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory / file")
    p.add_argument("--no_verify", "--no-verify", action="store_true",
                   help="skip reloading and comparing (not recommended)")
    p.add_argument("--from-hf", "--from_hf", dest="from_hf", default=None,
                   help="import: a Hugging Face MLCDVisionModel or CLIP vision directory to convert to our "
                        "native format (needs --out)")
    p.add_argument("--out", default=None, help="import: output native export X.pt (sidecar X.json beside it)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_hf:
        if not args.out:
            parser.error("--from-hf needs --out X.pt")
        out = Path(args.out)
        # X.pt and its sidecar X.json are written beside each other: never into the HF folder
        check_out_separate("--out", out, [("--from-hf", args.from_hf)], out_is_file=True, recursive=("--from-hf",))
        if out.exists() and not args.overwrite:
            raise MLCDError(f"{out}: already exists; pass --overwrite to replace it")
        from mlcd_train.models import model_config_to_dict

        with output_lock(out, "convert", beside=True):
            model = import_from_hf(args.from_hf, verify=not args.no_verify)
            save_native(model.state_dict(), model_config_to_dict(model), out, source=str(args.from_hf))
        c = model.config
        print(f"imported {args.from_hf} ({c.pos_embed}, width {c.width}, {c.layers} layers, {c.image_size} px) "
              f"to {out}")
        return 0
    if not args.checkpoint_path or not args.pytorch_dump_folder_path:
        parser.error("give --checkpoint_path and --pytorch_dump_folder_path (or --from-hf DIR --out X.pt)")
    if args.num_heads is not None and args.num_heads <= 0:
        raise MLCDError(f"--num_heads must be positive, got {args.num_heads}")
    report = convert_to_hf(args.checkpoint_path, args.pytorch_dump_folder_path, image_size=args.image_size,
                           num_heads=args.num_heads, act=args.act, overwrite=args.overwrite,
                           verify=not args.no_verify)
    c = report["model_config"]
    msg = (f"wrote {report['hf_class']} ({c['pos_embed']}, width {c['width']}, {c['layers']} layers, "
           f"{c['heads']} heads, {c['image_size']} px) to {args.pytorch_dump_folder_path}")
    if "checks" in report:
        k = report["checks"]
        msg += (f"; verified: min class-token cosine {k['min_cls_cosine']:.7f}, last hidden state max rel diff "
                f"{k['last_hidden_max_rel_diff']:.2e}")
    print(msg)
    return 0


if __name__ == "__main__":
    from mlcd_train.cli import run_stage

    sys.exit(run_stage("convert", sys.argv[1:]))


__all__ = ["convert_to_hf", "import_from_hf", "load_hf", "read_hf_weights", "hf_outputs", "native_to_hf_state_dict",
           "hf_to_native_state_dict", "canonical_hf_state_dict", "to_model_layout", "hf_prefix", "hf_config_for",
           "hf_class_for", "image_processor_for", "verify_against", "compare_outputs"]
