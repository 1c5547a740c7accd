"""Training configuration: YAML presets, ``key=value`` overrides, a typed schema, validation.

A config is built in three layers::

    defaults (the dataclasses below)  <-  YAML preset (--config)  <-  key=value overrides

``--config`` takes a path to a YAML file or the name of a preset in ``configs/``
(``fashion_mnist_tiny`` or ``fashion_mnist_tiny.yaml``).  A YAML file may start from another
one with ``base: other_preset`` (resolved next to it, then in ``configs/``).  Overrides use
dotted keys and YAML values: ``train.steps=200 optim.lr=5e-4 data.aug.flip=false
model.overrides={image_size: 28}``.

Every key is checked against the schema: an unknown key is an error that names it (and
suggests the closest known key); a value of the wrong type is an error naming the key.
:func:`validate` then checks the merged config against the run (world size) and the data
(the label folder's ``meta.json``), again naming the key at fault.  The resolved config is
saved as ``OUT/config.yaml`` (atomically) by the trainer.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from mlcd_train.utils.errors import MLCDError
from mlcd_train.utils.io import atomic_write_text
from mlcd_train.losses import LOSSES, loss_names

def _configs_dir() -> Path:
    """The presets: ``configs/`` of the source tree (editable installs, a checkout), else the
    copy a wheel installs under ``<prefix>/share/mlcd/configs`` (setup.py's data_files)."""
    import sys

    here = Path(__file__).resolve().parent.parent / "configs"
    for d in (here, Path(sys.prefix) / "share" / "mlcd" / "configs"):
        if d.is_dir():
            return d
    return here


CONFIGS_DIR = _configs_dir()

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class AugConfig:
    """Training augmentation (applied per sample, seeded by (seed, rank, stream position))."""
    random_resized_crop: bool = True   # False: resize to image_size (no crop)
    scale: list = field(default_factory=lambda: [0.4, 1.0])
    ratio: list = field(default_factory=lambda: [0.75, 4.0 / 3.0])
    flip: bool = True
    rand_augment: int = 0               # RandAugment operations per image (0: off; the authors use 2)
    rand_augment_magnitude: int = 9     # RandAugment magnitude, 0-30 (the authors' 9)
    color_jitter: float = 0.0           # brightness / contrast / saturation strength (0: off; the authors' 0.4)
    random_erasing: float = 0.0         # probability of erasing one random box (0: off; the authors' 0.25)
    mean: list = field(default_factory=lambda: list(CLIP_MEAN))
    std: list = field(default_factory=lambda: list(CLIP_STD))


@dataclass
class DataConfig:
    shards: Optional[str] = None        # shard folder / tar / brace pattern (`mlcd shards` output)
    labels: Optional[str] = None        # label folder written by `mlcd assign`
    image_size: Optional[int] = None    # None: the model's image_size
    num_workers: int = 4                # DataLoader workers per rank
    prefetch_factor: int = 2
    shuffle_buffer: int = 1000          # records permuted together (seeded) in each worker's stream
    max_corrupt_fraction: float = 0.01  # stop when a loader worker's corrupt / read samples exceeds this
    check_keys_shards: int = 1          # shards whose keys are checked against the labels before step 1
    synthetic: bool = False             # in-memory random images and labels (benchmarks, smoke tests)
    synthetic_batches: int = 8          # distinct in-memory batches cycled through when synthetic
    sources: list = field(default_factory=list)  # several sources instead of shards/labels:
    # [{shards: S, labels: L, weight: w}, ...]; each sample drawn from one with probability ~ weight
    aug: AugConfig = field(default_factory=AugConfig)


@dataclass
class ModelConfig:
    name: str = "ViT-B-32-224"            # a preset of mlcd_train.models.list_models()
    overrides: dict = field(default_factory=dict)  # passed to create_model(name, **overrides)
    drop_path: Optional[float] = None   # stochastic depth rate (ViT and ResNet); None: the preset's (0)
    grad_checkpointing: bool = False
    compile: bool = False               # torch.compile the backbone


@dataclass
class LossConfig:
    name: str = "mlcd"                  # mlcd | unicom | mlc
    num_classes: Optional[int] = None   # k; None: read from LABELS/meta.json
    l: int = 8                          # positives per image: the first l columns of the labels
    sample_rate: float = 0.1            # r: fraction of negative centres sampled per step
    scale: float = 64.0                 # s
    margin: float = 0.3                 # m (positives only)
    margin_type: str = "arc"            # arc: cos(t+m) (ArcFace) | cos: cos(t)-m (CosFace)
    embedding_size: Optional[int] = None  # None: the model's output size


@dataclass
class OptimConfig:
    name: str = "adamw"                 # adamw | apex_adam | apex_lamb (apex must be installed)
    lr: float = 1e-3
    pfc_lr: Optional[float] = None      # learning rate of the class centres; None: lr
    weight_decay: float = 0.2           # not applied to norms, biases and embeddings
    pfc_weight_decay: Optional[float] = None  # None: weight_decay
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    fused: Optional[bool] = None        # None: fused AdamW (CUDA and CPU)
    clip_grad_norm: float = 5.0         # max L2 norm of the backbone gradient; 0 disables
    warmup_steps: int = 2000            # linear warm-up from 0
    schedule: str = "cosine"            # cosine | constant (after warm-up)
    min_lr_ratio: float = 0.0           # cosine floor as a fraction of lr


@dataclass
class TrainConfig:
    steps: Optional[int] = None         # total optimiser steps (required)
    global_batch_size: Optional[int] = None  # images per step over all ranks (required)
    save_every: int = 1000              # checkpoint every N steps (and always at the end)
    keep_last: int = 3                  # complete checkpoints kept
    log_every: int = 10                 # metrics.jsonl / tensorboard / progress line
    precision: str = "bf16"             # bf16 (autocast on GPU) | fp16 (autocast + GradScaler on GPU) | fp32;
    # on CPU bf16 and fp16 run in fp32 unless cpu_autocast is set
    cpu_autocast: bool = False          # bf16 also autocasts on the CPU (precision bf16 only): about 1.8x a
    # ResNet-18 step on a CPU with AVX512-BF16 or AMX, slower on CPUs without (a warning says so)
    channels_last: bool = False         # hand the tower its images in channels_last (NHWC) memory format, which
    # the convolutions then keep: about 1.1x a ResNet step on the CPU; the weights stay as they are
    device: str = "auto"                # auto | cpu | cuda
    max_nonfinite_steps: int = 10       # abort after this many non-finite steps in a row
    parallel: str = "ddp"               # ddp | fsdp (FSDP2: sharded backbone + DCP checkpoints; trainer/parallel.py)
    async_save: bool = False            # fsdp: write checkpoints in the background (dcp.async_save)
    accum_steps: int = 1                # micro-batches per optimiser step (exactly one step at the full batch)
    stop_check_every: int = 10          # steps between the ranks' agreement on a stop signal / non-finite run
    # (also on log and save steps); the steps between read nothing back from the device
    peak_flops: Optional[float] = None  # FLOP/s of one device for MFU; None: a table of known GPUs, else n/a
    wandb: Optional[str] = None         # a wandb project to log to as well (needs the wandb package)
    tune_malloc: bool = True            # on the CPU: glibc's malloc keeps freed buffers instead of handing them
    # back every step (mlcd_core/malloc.py; about 1.7x the images a second on the demo); false: its defaults


@dataclass
class EvalConfig:
    """k-NN evaluation during training (mlcd_train/trainer/evaluation.py); off unless ``every`` > 0."""
    train: Optional[str] = None         # shards with ground-truth cls: the k-NN's memory
    test: Optional[str] = None          # shards with ground-truth cls: what is scored
    every: int = 0                      # steps between evaluations (0: off); the last step is always evaluated
    knn_k: int = 20                     # neighbours voting
    temperature: float = 0.07           # vote weight exp(sim / temperature)
    max_train: int = 10000              # first N samples of eval.train held in memory (0: all)
    max_test: int = 10000               # first N samples of eval.test (0: all)
    batch_size: int = 256               # images per forward pass
    keep_best: bool = True              # keep OUT/best/ (model.pt + meta.json): the checkpoint of the best k-NN


@dataclass
class InitConfig:
    """Start a fresh run from the backbone of another (mlcd_train/trainer/init.py)."""
    checkpoint: Optional[str] = None    # export X.pt (+ X.json), model.pt, checkpoint or run folder; only when
    # the run starts fresh (no checkpoint in output_dir): Partial FC, optimiser and schedule start at step 0


@dataclass
class Config:
    output_dir: Optional[str] = None    # OUT: config.yaml, metrics.jsonl, tb/, checkpoints/
    seed: int = 0
    resume: str = "auto"                # auto (newest complete checkpoint in OUT) | none | PATH
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    init: InitConfig = field(default_factory=InitConfig)


LOSS_NAMES = loss_names()  # the registry of mlcd_train/losses.py: one function + one registration a loss
OPTIM_NAMES = ("adamw", "apex_adam", "apex_lamb")
PRECISIONS = ("bf16", "fp16", "fp32")


# ----------------------------------------------------------------------------- schema helpers

def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (leaves and sections)."""
    out = []
    hints = _hints(cls)
    for name in _fields(cls):
        key = prefix + name
        out.append(key)
        if dataclasses.is_dataclass(hints[name]):
            out += all_keys(hints[name], key + ".")
    return out


def _unknown(key: str) -> MLCDError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return MLCDError(f"config key {key!r}: unknown key{hint}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotated type ``tp``; convert int -> float where harmless."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(types, "UnionType", typing.Union)):  # types.UnionType: 3.10+
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MLCDError(f"config key {key!r}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise MLCDError(f"config key {key!r}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise MLCDError(f"config key {key!r}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise MLCDError(f"config key {key!r}: expected a string, got {value!r}")
        return str(value)
    if tp is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise MLCDError(f"config key {key!r}: expected a list, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise MLCDError(f"config key {key!r}: expected a mapping, got {value!r}")
        return value
    return value


def _apply(obj, key_path: list[str], value: Any, full_key: str) -> None:
    cls = type(obj)
    name = key_path[0]
    if name not in _fields(cls):
        raise _unknown(full_key)
    tp = _hints(cls)[name]
    if len(key_path) > 1:
        if not dataclasses.is_dataclass(tp):
            if tp is dict:  # model.overrides.image_size=28
                d = dict(getattr(obj, name))
                d[".".join(key_path[1:])] = value
                setattr(obj, name, d)
                return
            raise _unknown(full_key)
        _apply(getattr(obj, name), key_path[1:], value, full_key)
        return
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise MLCDError(f"config key {full_key!r}: is a section, expected a mapping, got {value!r}")
        for k, v in value.items():
            _apply(getattr(obj, name), [str(k)], v, f"{full_key}.{k}")
        return
    setattr(obj, name, _coerce(full_key, value, tp))


def merge_dict(cfg: Config, d: dict, prefix: str = "") -> Config:
    """Apply a (nested) mapping onto ``cfg`` in place; keys are checked against the schema."""
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        _apply(cfg, key.split("."), v, key)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=5e-4"`` -> ("optim.lr", 0.0005); the value is parsed as YAML."""
    if "=" not in text:
        raise MLCDError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise MLCDError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError as exc:
        raise MLCDError(f"config key {key!r}: value {raw!r} is not valid YAML ({exc})") from None
    if isinstance(value, str) and _looks_float(value):
        value = float(value)  # YAML 1.1 reads "5e-4" as a string
    return key, value


def _looks_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return s.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity")


def _fix_yaml_floats(obj):
    if isinstance(obj, dict):
        return {k: _fix_yaml_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fix_yaml_floats(v) for v in obj]
    if isinstance(obj, str) and _looks_float(obj):
        return float(obj)
    return obj


def resolve_preset(spec: str, relative_to: Path | None = None) -> Path:
    """A path to a YAML file, or a preset name in ``configs/`` (with or without ``.yaml``)."""
    cands = [Path(spec)]
    if relative_to is not None:
        cands.append(relative_to / spec)
    for base in (CONFIGS_DIR,):
        cands += [base / spec, base / f"{spec}.yaml"]
        if relative_to is not None:
            cands.append(relative_to / f"{spec}.yaml")
    for c in cands:
        if c.is_file():
            return c.resolve()
    names = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")) if CONFIGS_DIR.is_dir() else []
    raise MLCDError(f"--config {spec!r}: no such file and no such preset in {CONFIGS_DIR} "
                    f"(presets: {', '.join(names) or 'none'})")


MAX_YAML_BYTES = 16 << 20


def load_yaml_chain(path: Path, _seen: tuple = ()) -> list[tuple[Path, dict]]:
    """The YAML file and the files it inherits from (``base:``), outermost base first."""
    if path in _seen:
        raise MLCDError(f"{path}: 'base' chain loops back to itself")
    from mlcd_core.io import read_regular

    try:  # a regular file of bounded size (a config is never near 16 MiB), UTF-8, nesting bounded
        data = yaml.safe_load(read_regular(path, MAX_YAML_BYTES, "config file").decode("utf-8")) or {}
    except MLCDError:
        raise
    except OSError as exc:
        raise MLCDError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise MLCDError(f"{path}: not valid YAML (not UTF-8: {exc})") from None
    except RecursionError:
        raise MLCDError(f"{path}: not valid YAML (nested too deeply)") from None
    except yaml.YAMLError as exc:
        raise MLCDError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise MLCDError(f"{path}: expected a mapping at the top level")
    data = _fix_yaml_floats(data)
    base = data.pop("base", None)
    chain = []
    if base:
        chain = load_yaml_chain(resolve_preset(str(base), path.parent), _seen + (path,))
    return chain + [(path, data)]


def build_config(config: str | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Defaults <- preset/YAML file (and its ``base`` chain) <- ``key=value`` overrides."""
    cfg = Config()
    if config:
        for path, data in load_yaml_chain(resolve_preset(config)):
            try:
                merge_dict(cfg, data)
            except MLCDError as exc:
                raise MLCDError(f"{path}: {exc}") from None
    for text in overrides:
        key, value = parse_override(text)
        _apply(cfg, key.split("."), value, key)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    return merge_dict(Config(), d)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (``OUT/config.yaml``)."""
    atomic_write_text(path, to_yaml(cfg))


# ----------------------------------------------------------------------------- validation

def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise MLCDError(f"config key {key!r}: {msg}")


def validate(cfg: Config, world_size: int = 1, labels_meta: dict | None = None) -> Config:
    """Check the merged config; fills ``loss.num_classes`` from ``labels_meta['k']`` when absent.

    ``labels_meta`` is the label folder's ``meta.json`` (None for synthetic data).
    Raises MLCDError naming the key at fault.
    """
    t, d, lo, o = cfg.train, cfg.data, cfg.loss, cfg.optim
    _need(bool(cfg.output_dir), "output_dir", "required (the folder for checkpoints, logs and config.yaml)")
    _need(t.steps is not None and t.steps > 0, "train.steps", f"must be a positive integer, got {t.steps!r}")
    _need(t.global_batch_size is not None and t.global_batch_size > 0, "train.global_batch_size",
          f"must be a positive integer, got {t.global_batch_size!r}")
    _need(t.global_batch_size % world_size == 0, "train.global_batch_size",
          f"{t.global_batch_size} is not divisible by the world size {world_size}")
    _need(t.save_every > 0, "train.save_every", f"must be positive, got {t.save_every}")
    _need(t.keep_last >= 1, "train.keep_last", f"must be at least 1, got {t.keep_last}")
    _need(t.log_every > 0, "train.log_every", f"must be positive, got {t.log_every}")
    _need(t.precision in PRECISIONS, "train.precision",
          f"must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
    for key in ("cpu_autocast", "channels_last"):
        _need(isinstance(getattr(t, key), bool), f"train.{key}", f"must be true or false, got {getattr(t, key)!r}")
    _need(not t.cpu_autocast or t.precision == "bf16", "train.cpu_autocast",
          f"autocasts bf16 only; set train.precision=bf16 (got {t.precision})")
    _need(t.device in ("auto", "cpu", "cuda"), "train.device", f"must be auto, cpu or cuda, got {t.device!r}")
    _need(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be at least 1")
    _need(t.parallel in ("ddp", "fsdp"), "train.parallel", f"must be ddp or fsdp, got {t.parallel!r}")
    _need(isinstance(t.async_save, bool), "train.async_save", f"must be true or false, got {t.async_save!r}")
    _need(not t.async_save or t.parallel == "fsdp", "train.async_save",
          "needs train.parallel=fsdp (sharded checkpoints are the ones written in the background)")
    _need(not (t.parallel == "fsdp" and t.precision == "fp16"), "train.parallel",
          "fsdp runs with train.precision bf16 or fp32 (fp16 loss scaling of sharded gradients is not supported)")
    _need(isinstance(t.accum_steps, int) and not isinstance(t.accum_steps, bool) and t.accum_steps >= 1,
          "train.accum_steps", f"must be a positive integer, got {t.accum_steps!r}")
    _need(t.global_batch_size % (world_size * t.accum_steps) == 0, "train.accum_steps",
          f"global batch {t.global_batch_size} is not divisible by world size {world_size} x accum_steps "
          f"{t.accum_steps}")
    _need(lo.name in LOSSES, "loss.name", f"must be one of {', '.join(loss_names())}, got {lo.name!r}")
    _need(0.0 < lo.sample_rate <= 1.0, "loss.sample_rate", f"must be in (0, 1], got {lo.sample_rate}")
    _need(lo.l >= 1, "loss.l", f"must be at least 1, got {lo.l}")
    _need(lo.margin_type in ("arc", "cos"), "loss.margin_type",
          f"must be arc or cos, got {lo.margin_type!r}")
    _need(lo.scale > 0, "loss.scale", f"must be positive, got {lo.scale}")
    _need(0 <= lo.margin < (math.pi / 2 if lo.margin_type == "arc" else 1.0), "loss.margin",
          f"must be in [0, {'pi/2' if lo.margin_type == 'arc' else '1'}) for margin_type={lo.margin_type}, "
          f"got {lo.margin}")
    _need(o.name in OPTIM_NAMES, "optim.name", f"must be one of {', '.join(OPTIM_NAMES)}, got {o.name!r}")
    _need(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    _need(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _need(o.schedule in ("cosine", "constant"), "optim.schedule", f"must be cosine or constant, got {o.schedule!r}")
    _need(o.pfc_lr is None or o.pfc_lr > 0, "optim.pfc_lr", f"must be positive, got {o.pfc_lr}")
    _need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _need(o.pfc_weight_decay is None or o.pfc_weight_decay >= 0, "optim.pfc_weight_decay",
          f"must be >= 0, got {o.pfc_weight_decay}")
    _need(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    _need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
          f"expected two numbers in [0, 1), got {o.betas!r}")
    _need(o.clip_grad_norm >= 0, "optim.clip_grad_norm", "must be >= 0 (0 disables clipping)")
    _need(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _need(0.0 <= d.max_corrupt_fraction <= 1.0, "data.max_corrupt_fraction", "must be in [0, 1]")
    _need(len(d.aug.scale) == 2 and 0 < d.aug.scale[0] <= d.aug.scale[1] <= 1, "data.aug.scale",
          f"expected [min, max] with 0 < min <= max <= 1, got {d.aug.scale!r}")
    _need(len(d.aug.ratio) == 2 and 0 < d.aug.ratio[0] <= d.aug.ratio[1], "data.aug.ratio",
          f"expected [min, max] with 0 < min <= max, got {d.aug.ratio!r}")
    _need(len(d.aug.mean) == 3 and len(d.aug.std) == 3, "data.aug.mean",
          "data.aug.mean and data.aug.std need 3 values each")
    _need(all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in d.aug.mean),
          "data.aug.mean", f"expected 3 finite numbers, got {d.aug.mean!r}")
    _need(all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
              for v in d.aug.std), "data.aug.std", f"expected 3 positive finite numbers, got {d.aug.std!r}")
    _need(0 <= d.aug.rand_augment <= 16, "data.aug.rand_augment", f"must be in [0, 16], got {d.aug.rand_augment}")
    _need(0 <= d.aug.rand_augment_magnitude <= 30, "data.aug.rand_augment_magnitude",
          f"must be in [0, 30], got {d.aug.rand_augment_magnitude}")
    _need(0.0 <= d.aug.color_jitter <= 1.0, "data.aug.color_jitter", f"must be in [0, 1], got {d.aug.color_jitter}")
    _need(0.0 <= d.aug.random_erasing <= 1.0, "data.aug.random_erasing",
          f"must be in [0, 1], got {d.aug.random_erasing}")
    e = cfg.eval
    _need(e.every >= 0, "eval.every", f"must be >= 0 (0: no evaluation), got {e.every}")
    if e.every > 0:
        _need(bool(e.train), "eval.train", "required with eval.every > 0 (labelled shards: the k-NN's memory)")
        _need(bool(e.test), "eval.test", "required with eval.every > 0 (labelled shards to score)")
    _need(e.knn_k >= 1, "eval.knn_k", f"must be at least 1, got {e.knn_k}")
    _need(math.isfinite(e.temperature) and e.temperature > 0, "eval.temperature",
          f"must be a positive number, got {e.temperature}")
    _need(e.max_train >= 0 and e.max_test >= 0, "eval.max_train", "eval.max_train and eval.max_test must be >= 0")
    _need(e.batch_size >= 1, "eval.batch_size", f"must be at least 1, got {e.batch_size}")
    _need(cfg.init.checkpoint is None or bool(str(cfg.init.checkpoint).strip()), "init.checkpoint",
          "empty path (leave it unset to start from a random initialisation)")
    _need(cfg.model.drop_path is None or 0.0 <= cfg.model.drop_path < 1.0, "model.drop_path",
          f"must be in [0, 1), got {cfg.model.drop_path}")
    if lo.name in LOSSES and LOSSES[lo.name].single_positive:
        _need(lo.l == 1, "loss.l", f"the {lo.name} loss uses one positive per image: set loss.l=1 (got {lo.l})")
    _need(t.stop_check_every >= 1, "train.stop_check_every", f"must be at least 1, got {t.stop_check_every}")
    _need(t.peak_flops is None or (math.isfinite(t.peak_flops) and t.peak_flops > 0), "train.peak_flops",
          f"must be a positive number of FLOP/s, got {t.peak_flops}")
    _need(t.wandb is None or bool(str(t.wandb).strip()), "train.wandb", "empty project name")
    for i, src in enumerate(d.sources):
        key = f"data.sources[{i}]"
        _need(isinstance(src, dict) and bool(src.get("shards")) and bool(src.get("labels")), "data.sources",
              f"{key}: expected a mapping with shards, labels and weight, got {src!r}")
        extra = sorted(set(src) - {"shards", "labels", "weight"})
        _need(not extra, "data.sources", f"{key}: unknown key {extra[0] if extra else ''!r} "
              "(expected shards, labels, weight)")
        wt = src.get("weight", 1.0)
        _need(isinstance(wt, (int, float)) and not isinstance(wt, bool) and math.isfinite(wt) and wt > 0,
              "data.sources", f"{key}: weight must be a positive number, got {wt!r}")
    if d.sources:
        _need(not d.shards and not d.labels, "data.sources",
              "give either data.sources or data.shards + data.labels, not both")
    if d.synthetic:
        _need(lo.num_classes is not None, "loss.num_classes", "required with data.synthetic=true")
    elif not d.sources:
        _need(bool(d.shards), "data.shards", "required (a shard folder written by `mlcd shards`) "
              "unless data.synthetic=true")
        _need(bool(d.labels), "data.labels", "required (the label folder written by `mlcd assign`)")
    if labels_meta is not None:
        where = f"{d.labels or d.sources[0]['labels']}/meta.json"
        k, width = labels_meta.get("k"), labels_meta.get("topk")
        if k is None or width is None:
            raise MLCDError(f"{where}: needs 'k' and 'topk'")
        if lo.num_classes is None:
            lo.num_classes = int(k)
        _need(lo.num_classes == int(k), "loss.num_classes",
              f"{lo.num_classes} differs from the labels' range k={k} in {where}")
        _need(lo.l <= int(width), "loss.l",
              f"{lo.l} is larger than the label files' width topk={width} in {where}")
    _need(lo.num_classes is not None and lo.num_classes >= 1, "loss.num_classes",
          f"must be a positive integer, got {lo.num_classes!r}")
    return cfg
